"""llmbuild::linear against aten's linear (and fp32 math), across the decode kernel and the fallback."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.linear import linear_ref


# 1-4 streaming tiles; 5-6 panels (5-16 on AVX-512); AVX2 widened panels 7-64; aten above
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 65])
@pytest.mark.parametrize("k", [64, 100, 2048])  # 100: a tail shorter than one vector
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_matches_fp32_math_within_rounding(kernel_isa, m, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(77, k, generator=g).bfloat16()  # 77 rows: not a multiple of the row tile
    b = torch.randn(77, generator=g).bfloat16() if bias else None
    out = torch.ops.llmbuild.linear(x, w, b)
    exact = x.float() @ w.float().T + (b.float() if bias else 0)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 77)
    # one bf16 rounding of the result (plus summation-order noise)
    torch.testing.assert_close(out.float(), exact, atol=0.05 * k**0.5, rtol=2**-7)
    torch.testing.assert_close(out.float(), linear_ref(x, w, b).float(), atol=0.05 * k**0.5, rtol=2**-6)


# around the AVX2 widened panels (7-64 rows): 4-row tiles and remainders of 1, 2 and 3 rows
@pytest.mark.parametrize("m", [6, 7, 10, 12, 13, 16, 33, 63])
@pytest.mark.parametrize("n", [1, 2, 14, 25])  # panels of 12 weight rows in 3-row tiles: every remainder
@pytest.mark.parametrize("k", [8, 33, 40, 2048])  # 8: no whole vector; 33 / 40: a tail after the vectors
def test_every_output_is_the_exact_product_rounded_once(kernel_isa, m, n, k):
    g = torch.Generator().manual_seed(m * 10_000 + n * 100 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    out = torch.ops.llmbuild.linear(x, w, None).double()
    exact = x.double() @ w.double().T
    # fp32 sums of exact products err by at most k * 2^-24 * sum |x w| in any order (k <= 4096); rounding the
    # computed sum to bf16 adds at most 2^-8 of its magnitude
    fp32_err = (x.double().abs() @ w.double().abs().T) * k * 2**-24
    bound = (exact.abs() + fp32_err) * 2**-8 + fp32_err
    assert ((out - exact).abs() <= bound).all(), (out - exact).abs().max()


def test_fp32_and_batched_shapes_fall_back_to_aten_exactly():
    x = torch.randn(2, 3, 64)
    w = torch.randn(10, 64)
    assert torch.equal(torch.ops.llmbuild.linear(x, w, None), linear_ref(x, w, None))
    xb = x.bfloat16()
    out = torch.ops.llmbuild.linear(xb, w.bfloat16(), None)
    assert out.shape == (2, 3, 10)


def test_mismatches_fail_with_a_message():
    with pytest.raises(RuntimeError, match="does not fit w"):
        torch.ops.llmbuild.linear(torch.randn(1, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.llmbuild.linear(torch.randn(1, 8).bfloat16(), torch.randn(4, 8), None)


def test_opcheck():
    x, w, b = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16(), torch.randn(8).bfloat16()
    torch.library.opcheck(torch.ops.llmbuild.linear.default, (x, w, b))

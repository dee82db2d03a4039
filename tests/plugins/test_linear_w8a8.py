"""llmbuild::linear_w8a8 against its reference at every kernel tier this CPU executes, and the reference
against a plain fp32 matmul (within the error int8 activations and weights allow)."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.linear_int8 import quantize_int8
from llmbuild.plugins.linear_w8a8 import decode_ref, linear_w8a8_ref, quantize_per_token_ref, takes_decode_path

DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def _problem(m: int, k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.linspace(0.1, 4.0, k)).to(dtype)  # columns of different ranges
    w = torch.randn(n, k, generator=g) * torch.linspace(0.02, 1.0, n)[:, None]
    q, scales = quantize_int8(w, dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, q, scales, bias


def test_per_token_quantization_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-254.0, 127.0, 1.0, -0.5]])
    codes, scales = quantize_per_token_ref(x)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 0]]  # 63.5 -> 64, 0.5 -> 0 (even)
    assert scales.tolist() == pytest.approx([2 / 127, 0.0, 2.0])


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("k", [256, 200, 72])  # 200, 72: no multiple of 32 or 64, a tail of single columns
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_computes_exactly_its_reference(kernel_isa, m, k, dtype, bias):
    x, q, scales, b = _problem(m, k, 37, dtype, seed=m * k)
    if m > 1:
        x[1] = 0  # amax 0: scale 0, codes 0, the row's output is the bias
    b = b if bias else None
    out = torch.ops.llmbuild.linear_w8a8(x, q, scales, b)
    assert out.dtype == dtype and out.shape == (m, 37)
    if takes_decode_path(x):
        # linear_int8's decode kernel: its 32-column sums add up in fp32 in each tier's order
        ref = decode_ref(x, q, scales, b)
        tol = 2e-4 if dtype == torch.float32 else 2**-7
        assert (out.float() - ref).abs().max() <= tol * ref.abs().max(), (m, k)
    else:
        # int32 sums are exact and the scaling keeps the reference's fp32 order: bit for bit in every tier
        torch.testing.assert_close(out, linear_w8a8_ref(x, q, scales, b), atol=0, rtol=0)
    if m > 1:
        assert torch.equal(out[1], b if bias else torch.zeros(37, dtype=dtype))


@pytest.mark.parametrize("m", [1, 5, 64, 65, 128])  # the decode path, both VNNI kernels and their border
def test_large_k_sums_stay_exact(kernel_isa, m):
    # every product at +-127 * 127: sums near 2^27, where an int16 or fp32 accumulator would lose them
    k, n = 5632, 48
    g = torch.Generator().manual_seed(m)
    x = torch.full((m, k), 3.0)
    q = torch.where(torch.rand(n, k, generator=g) < 0.9, 127, -127).to(torch.int8)
    scales = torch.ones(n)
    out = torch.ops.llmbuild.linear_w8a8(x, q, scales, None)
    expected = (127 * q.long().sum(dim=1)).double() * (3.0 / 127)
    torch.testing.assert_close(out.double(), expected.expand(m, n), atol=0, rtol=2**-23)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_within_quantization_error_of_a_plain_matmul(dtype):
    x, q, scales, b = _problem(8, 512, 64, dtype, seed=0)
    ref = linear_w8a8_ref(x, q, scales, b).double()
    exact = x.double() @ (q.double() * scales.double()[:, None]).t() + b.double()
    # weights exact here (dequantized): only x's rounding, at most half a step per column, times |w|
    x_step = x.double().abs().amax(dim=1, keepdim=True) / 127
    bound = 0.5 * x_step * (q.double() * scales.double()[:, None]).abs().sum(dim=1)
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[dtype]  # the output's rounding
    assert torch.all((ref - exact).abs() <= bound + ulp * (exact.abs() + bound))
    # and the error is real but small: the reference does quantize
    rel = (ref - exact).norm() / exact.norm()
    assert 1e-4 < rel < 0.02


def test_batched_input_shape_empty_input_and_bad_inputs():
    q, s = quantize_int8(torch.randn(8, 32), torch.bfloat16)
    x = torch.randn(2, 3, 32).bfloat16()
    assert torch.ops.llmbuild.linear_w8a8(x, q, s, None).shape == (2, 3, 8)
    assert torch.ops.llmbuild.linear_w8a8(x[:0], q, s, None).shape == (0, 3, 8)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.llmbuild.linear_w8a8(x, q.float(), s, None)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.llmbuild.linear_w8a8(x, q, s.float(), None)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.llmbuild.linear_w8a8(torch.randn(1, 31).bfloat16(), q, s, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.llmbuild.linear_w8a8(x, q, s, torch.zeros(8))


def test_unaligned_and_strided_operands():
    # safetensors packs tensors back to back: weights may start anywhere; x may be a non-contiguous view
    q, s = quantize_int8(torch.randn(64, 256), torch.bfloat16)
    w = torch.empty(64 * 256 + 1, dtype=torch.int8)[1:].view(64, 256)
    w.copy_(q)
    x = torch.randn(256, 6).bfloat16().t()  # the GEMM path
    assert torch.equal(torch.ops.llmbuild.linear_w8a8(x, w, s, None), linear_w8a8_ref(x, q, s, None))
    x = x[:3]  # the decode path
    ref = decode_ref(x, q, s, None)
    assert (torch.ops.llmbuild.linear_w8a8(x, w, s, None).float() - ref).abs().max() <= 2**-7 * ref.abs().max()


def test_opcheck():
    q, s = quantize_int8(torch.randn(8, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.llmbuild.linear_w8a8.default, (torch.randn(2, 64).bfloat16(), q, s, None))

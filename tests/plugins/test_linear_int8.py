"""llmbuild::linear_int8 against its references, on both paths (quantized activations up to 16 rows, dequantize +
GEMM above), at every kernel tier this CPU executes."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.linear_int8 import dequantize_int8, linear_int8_decode_ref, linear_int8_ref, quantize_int8


def test_quantize_round_trip_is_within_half_a_step():
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scales = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (dequantize_int8(q, scales) - w).abs()
    assert torch.all(err <= scales[:, None] / 2 + 1e-6)
    assert torch.all(q.abs().amax(dim=1) == 127)  # each row uses its full range


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("k", [256, 224, 96])  # 224, 96: a last 64-column load holds only 32 columns
def test_decode_path_computes_exactly_its_reference(kernel_isa, m, k):
    g = torch.Generator().manual_seed(m)
    q, scales = quantize_int8(torch.randn(37, k, generator=g) * torch.linspace(0.02, 1.0, 37)[:, None], torch.float32)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(37, generator=g)
    out = torch.ops.llmbuild.linear_int8(x, q, scales, bias)
    # fp32 activations: only summation order differs from the reference of the same arithmetic
    torch.testing.assert_close(out, linear_int8_decode_ref(x, q, scales, bias), atol=2e-4, rtol=1e-4)
    # and int8 activation quantization stays within ~1% of the exact product
    exact = linear_int8_ref(x, q, scales, bias)
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("m", [1, 3, 15, 16, 17, 100])  # <= 16: quantized activations; above: dequantize + GEMM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [208, 200])  # 200 is no multiple of 32: dequantize + GEMM at every m
def test_matches_the_reference(kernel_isa, m, dtype, bias, k):
    g = torch.Generator().manual_seed(m)
    n = 72
    x = torch.randn(m, k, generator=g).to(dtype)
    q, scales = quantize_int8(torch.randn(n, k, generator=g), dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = torch.ops.llmbuild.linear_int8(x, q, scales, b)
    ref = linear_int8_ref(x.float(), q, scales.float(), b.float() if bias else None)
    assert out.dtype == dtype and out.shape == (m, n)
    dense = m > 16 or k % 32
    tol = 0.02 if not dense else (1e-5 if dtype == torch.float32 else 2**-7)
    assert (out.float() - ref).abs().max() < tol * ref.abs().max()


def test_batched_input_shape_and_bad_inputs():
    q, s = quantize_int8(torch.randn(8, 32), torch.bfloat16)
    x = torch.randn(2, 3, 32).bfloat16()
    assert torch.ops.llmbuild.linear_int8(x, q, s, None).shape == (2, 3, 8)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.llmbuild.linear_int8(x, q.float(), s, None)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.llmbuild.linear_int8(x, q, s.float(), None)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.llmbuild.linear_int8(torch.randn(1, 31).bfloat16(), q, s, None)


def test_opcheck():
    q, s = quantize_int8(torch.randn(8, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.llmbuild.linear_int8.default, (torch.randn(2, 64).bfloat16(), q, s, None))


def test_unaligned_weights_and_scales():
    # safetensors packs tensors back to back: weights and scales may start anywhere
    q, s = quantize_int8(torch.randn(64, 256), torch.bfloat16)
    w_buf = torch.empty(64 * 256 + 1, dtype=torch.int8)
    w = w_buf[1:].view(64, 256)
    w.copy_(q)
    s_buf = torch.empty(65, dtype=torch.bfloat16)
    s_odd = s_buf[1:]
    s_odd.copy_(s)
    x = torch.randn(3, 256).bfloat16()
    expected = torch.ops.llmbuild.linear_int8(x, q, s, None)
    assert torch.equal(torch.ops.llmbuild.linear_int8(x, w, s, None), expected)
    assert torch.equal(torch.ops.llmbuild.linear_int8(x, q, s_odd, None), expected)

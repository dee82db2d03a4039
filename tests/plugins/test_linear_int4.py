"""llmbuild::linear_int4 against its references, on both paths (quantized activations up to 16 rows, dequantize +
GEMM above), at every kernel tier this CPU executes."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.linear_int4 import (
    dequantize_int4,
    linear_int4_decode_ref,
    linear_int4_ref,
    pack_int4,
    quantize_int4,
    unpack_int4,
)


def int4_weight(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.02, 1.0, n)[:, None] + 0.1  # offset: zero points matter
    q, scales, mins = quantize_int4(w, group)
    return w, pack_int4(q), scales, mins


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_round_trip_is_within_half_a_step(group):
    w, packed, scales, mins = int4_weight(24, 256, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128)
    assert scales.shape == mins.shape == (24, 256 // group) and scales.dtype == torch.bfloat16
    step = scales.float().repeat_interleave(group, dim=1)
    err = (dequantize_int4(packed, scales, mins) - w).abs()
    assert torch.all(err <= step / 2 + 1e-2 * step + 1e-6)


def test_packing_layout_is_the_documented_one():
    q = torch.arange(128, dtype=torch.uint8).remainder(16).repeat(2, 1)  # column c holds c % 16
    packed = pack_int4(q)
    # byte i of a 64-column block: column i in the low nibble, column i + 32 in the high nibble
    assert packed[0, 0].item() == (0 | (32 % 16) << 4)
    assert packed[0, 5].item() == (5 | (37 % 16) << 4)
    assert packed[0, 32].item() == (64 % 16 | (96 % 16) << 4)
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16])
# K=320: the last 128-column step holds only 64 columns
@pytest.mark.parametrize("group,k", [(32, 256), (64, 256), (128, 256), (32, 320), (64, 320), (128, 384)])
def test_decode_path_computes_exactly_its_reference(kernel_isa, m, group, k):
    _, packed, scales, mins = int4_weight(37, k, group, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m))
    bias = torch.randn(37)
    out = torch.ops.llmbuild.linear_int4(x, packed, scales, mins, bias)
    # fp32 activations: only summation order differs from the reference of the same arithmetic
    torch.testing.assert_close(out, linear_int4_decode_ref(x, packed, scales, mins, bias), atol=2e-4, rtol=1e-4)
    # and int8 activation quantization stays within ~1% of the exact product
    exact = linear_int4_ref(x, packed, scales, mins, bias)
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("m", [1, 7, 17, 64])  # 17, 64: dequantize + GEMM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [32, 128])
def test_matches_the_dequantized_reference(kernel_isa, m, dtype, group):
    _, packed, scales, mins = int4_weight(72, 512, group, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(72).to(dtype)
    out = torch.ops.llmbuild.linear_int4(x, packed, scales, mins, bias)
    ref = linear_int4_ref(x.float(), packed, scales, mins, bias.float())
    assert out.dtype == dtype and out.shape == (m, 72)
    scale = ref.abs().max()
    tol = 0.02 if m <= 16 else (1e-5 if dtype == torch.float32 else 2**-7)
    assert (out.float() - ref).abs().max() < tol * scale


def test_batched_shape_and_bad_inputs():
    _, packed, scales, mins = int4_weight(8, 128, 64)
    x = torch.randn(2, 3, 128).bfloat16()
    assert torch.ops.llmbuild.linear_int4(x, packed, scales, mins, None).shape == (2, 3, 8)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.llmbuild.linear_int4(x, packed.to(torch.int8), scales, mins, None)
    with pytest.raises(RuntimeError, match="scales and mins must be contiguous bf16"):
        torch.ops.llmbuild.linear_int4(x, packed, scales.float(), mins, None)
    with pytest.raises(RuntimeError, match="group size of 32, 64 or 128"):
        torch.ops.llmbuild.linear_int4(x, packed, scales[:, :1].repeat(1, 3), mins, None)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.llmbuild.linear_int4(torch.randn(1, 64).bfloat16(), packed, scales, mins, None)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 96), 64)


def test_opcheck():
    _, packed, scales, mins = int4_weight(8, 128, 32)
    torch.library.opcheck(
        torch.ops.llmbuild.linear_int4.default, (torch.randn(2, 128).bfloat16(), packed, scales, mins, None)
    )

"""FP8 (e4m3) numerics, checked on CPU by emulation: the grid, per-tensor vs per-channel scales,
no saturation, and the emulated fp8 GEMM against the fp32 linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmbuild.plugins import load_plugins
from llmbuild.plugins.linear_fp8 import FP8, FP8_MAX, dequantize_fp8, linear_fp8_ref, quantize_fp8


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn value, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    return values[values.isfinite()].unique()


def test_e4m3_grid_is_the_one_the_format_defines():
    values = e4m3_values()
    assert FP8_MAX == 448 and values.max() == 448 and values.min() == -448
    positive = values[values > 0]
    assert positive.min() == 2**-9  # smallest subnormal: 2^-6 x 2^-3
    normal = positive[positive >= 2**-6]
    assert len(normal) == 14 * 8 + 7  # exponents -6..7 with 8 mantissas each; exponent 8: 256..448 (S.1111.111 is NaN)
    # the grid round-trips exactly through the quantizer (scale 1: a row whose max is 448)
    row = torch.cat([values, torch.tensor([448.0])])[None]
    q, scales = quantize_fp8(row, "channel")
    assert scales.item() == 1.0 and torch.equal(dequantize_fp8(q, scales), row)


def test_rounding_error_is_within_half_a_step_of_the_e4m3_grid():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    q, scales = quantize_fp8(w, "channel")
    assert q.dtype == FP8 and scales.shape == (64,)
    scaled = (w / scales[:, None]).abs()
    normal = scaled >= 2**-6
    rel = ((dequantize_fp8(q, scales) - w).abs() / scales[:, None])[normal] / scaled[normal]
    assert rel.max() <= 2**-4 + 1e-6  # 3 mantissa bits: half a step is 1/16 of the value at most
    assert (w.abs().amax(1) / scales).sub(FP8_MAX).abs().max() < 1e-3  # each row's max lands on 448


def test_per_channel_scales_beat_a_per_tensor_scale_on_rows_of_different_magnitude():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=gen) * torch.logspace(-6, 0, 32)[:, None]
    err = {g: (dequantize_fp8(*quantize_fp8(w, g)) - w).pow(2).sum(1) / w.pow(2).sum(1) for g in ("tensor", "channel")}
    assert quantize_fp8(w, "tensor")[1].shape == (1,)
    assert err["channel"].max() < 0.01 and err["tensor"].max() > 10 * err["channel"].max()  # small rows underflow


def test_outliers_never_saturate_into_nan_or_clip():
    w = torch.randn(4, 64)
    w[2, 5] = 1e6
    q, scales = quantize_fp8(w, "tensor")
    deq = dequantize_fp8(q, scales)
    assert torch.isfinite(deq).all() and deq[2, 5] == pytest.approx(1e6, rel=2**-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_emulated_fp8_linear_matches_the_fp32_linear(dtype, granularity):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 256, generator=gen).to(dtype)
    w = torch.randn(96, 256, generator=gen) * 0.05
    bias = torch.randn(96, generator=gen)
    q, scales = quantize_fp8(w, granularity)
    y = linear_fp8_ref(x, q, scales, bias)
    assert y.dtype == dtype and y.shape == (5, 96)
    expected = F.linear(x.float(), w, bias)
    rel = (y.float() - expected).norm() / expected.norm()
    assert rel < 0.05  # two 3-bit-mantissa roundings (x and w) per product, averaged over K
    assert rel > 1e-4  # and it is quantized: not the fp32 result


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_matches_the_reference(dtype, tol, granularity, bias):
    load_plugins()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 128, generator=gen).to(dtype)
    q, scales = quantize_fp8(torch.randn(40, 128, generator=gen) * torch.logspace(-2, 0, 40)[:, None], granularity)
    b = torch.randn(40, generator=gen).to(dtype) if bias else None
    expected = linear_fp8_ref(x, q, scales, b)
    out = torch.ops.llmbuild.linear_fp8(x, q, scales, b)
    assert out.shape == expected.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_cpu_kernel_names_a_weight_that_is_not_fp8():
    load_plugins()
    with pytest.raises(RuntimeError, match="linear_fp8: w must be float8_e4m3fn"):
        torch.ops.llmbuild.linear_fp8(torch.randn(2, 16), torch.randn(4, 16), torch.ones(4), None)

"""`llmbuild::linear_fp8`: FP8 (e4m3) weights, their quantization numerics and the op's reference.

Format: weight float8_e4m3fn [N, K] with fp32 scales, one for the tensor ([1]) or one per output
row ([N]); w_real = q * scale, scale = amax / 448 (e4m3's largest finite value), so the largest
weight of the tensor (or row) maps onto 448 and nothing saturates. Activations are quantized
dynamically, one fp32 scale per step (per tensor), as torch._scaled_mm takes them on sm_89/sm_90.

CPU targets reject fp8 recipes (no fp8 GEMM on this hardware). A cuda engine runs the op as
torch._scaled_mm (plugins/triton/ops.py); the CPU kernel (csrc/linear_fp8.cpp), which the builder's
quality gate runs, emulates it: the fp8 products are exact in fp32, so `linear_fp8_ref` (dequantize,
multiply in fp32, scale) is what an fp8 GEMM with fp32 accumulation computes, up to summation order.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

OP_NAME = "llmbuild::linear_fp8"
VERSION = 1
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(
    w: torch.Tensor, granularity: Literal["tensor", "channel"] = "channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], fp32 scales [1] or [N]) with w ~ q * scale, rounded to nearest even."""
    w = w.float()
    amax = w.abs().amax() if granularity == "tensor" else w.abs().amax(dim=1)
    scales = (amax / FP8_MAX).clamp(min=1e-12).reshape(-1)
    q = (w / (scales if granularity == "tensor" else scales[:, None])).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from fp8 codes and per-tensor or per-row scales."""
    return q.float() * (scales if scales.numel() == 1 else scales[:, None])


def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor activation quantization: (q float8_e4m3fn, fp32 scale [1])."""
    scale = (x.float().abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(1)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear_fp8_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = fp8(x) @ fp8(w).T * x_scale * w_scales + bias, accumulated in fp32, in x's dtype."""
    xq, x_scale = quantize_activations_fp8(x)
    y = F.linear(xq.float(), q.float()) * x_scale * scales
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, w, scales, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

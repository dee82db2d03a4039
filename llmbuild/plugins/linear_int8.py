"""`llmbuild::linear_int8`: y = x @ dequant(w).T + bias for int8 weights with one scale per output row.

Format: w int8 [N, K], scales [N] in the activation dtype, w_real[n, k] ~= w[n, k] * scales[n]
(symmetric, round to nearest: `quantize_int8`). The CPU kernel (csrc/linear_int8.cpp) multiplies the
weight bytes against int8-quantized activations (one scale per 32 columns, as llama.cpp's Q8_0; AVX-512
VNNI, AVX2 or portable, the same sums in each) for decode-sized batches, and dequantizes to a dense GEMM
for larger ones (prefill). The reference dequantizes and runs aten's linear; `linear_int8_decode_ref`
adds the activation quantization, so the kernel's arithmetic can be checked exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OP_NAME = "llmbuild::linear_int8"
VERSION = 1
ACT_BLOCK = 32


def int8_scales(w: torch.Tensor, dtype: torch.dtype, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Symmetric scales [..., 1] of rows w [..., K], rounded to the stored dtype (kept as fp32), for
    the range shrunk by `clip` (<= 1; AWQ's clipping search)."""
    return ((w.float().abs().amax(dim=-1, keepdim=True) * clip).clamp(min=1e-8) / 127).to(dtype).float()


def round_int8(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes (float, -127..127) of w on the grid of `scales` (broadcast against w)."""
    return torch.round(w.float() / scales).clamp(-127, 127)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8 (round to nearest against the stored scale): (int8 [N, K], scales [N] in dtype)."""
    scales = int8_scales(w, dtype)
    return round_int8(w, scales).to(torch.int8), scales[:, 0].to(dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(scales.dtype) * scales[:, None]


def linear_int8_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(q, scales).to(x.dtype), bias)


def quantize_activations_ref(x: torch.Tensor) -> torch.Tensor:
    """The decode kernels' dynamic activation quantization (symmetric int8 per 32 columns), dequantized, fp32."""
    xb = x.float().reshape(*x.shape[:-1], -1, ACT_BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape)


def linear_int8_decode_ref(x, q, scales, bias):
    """What the decode path computes: quantized activations times the dequantized weight, in fp32."""
    bias = None if bias is None else bias.float()
    return F.linear(quantize_activations_ref(x), dequantize_int8(q, scales.float()), bias)


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, w, scales, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

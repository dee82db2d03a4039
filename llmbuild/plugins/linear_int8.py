"""`llmbuild::linear_int8`: y = x @ dequant(w).T + bias for int8 weights with one scale per output row.

Format: w int8 [N, K], scales [N] in the activation dtype, w_real[n, k] ~= w[n, k] * scales[n]
(symmetric, round to nearest: `quantize_int8`). The CPU kernel (csrc/linear_int8.cpp) runs aten's
int8-weight GEMM for decode-sized bf16 batches and dequantizes to a bf16/fp32 GEMM for larger
ones (prefill), where a dense GEMM is faster. The reference dequantizes and runs aten's linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OP_NAME = "llmbuild::linear_int8"
VERSION = 1


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8 (round to nearest): (int8 [N, K], scales [N] in dtype)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales.to(dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(scales.dtype) * scales[:, None]


def linear_int8_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(q, scales).to(x.dtype), bias)


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, w, scales, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

"""`llmbuild::linear`: y = x @ w.T + bias, with a decode-sized bf16 kernel (csrc/linear.cpp).

bf16 batches of up to 64 rows on the AVX2 tier (bf16 widened by shifts; from 7 rows a panel of weights at a time)
or 16 rows on the AVX-512 one (AVX512-BF16 dot products, or the AVX2 code where BF16 is missing) run llmbuild's
kernel; everything else, and CPUs below AVX2, run aten's linear (oneDNN; bf16 below AVX512-BF16 on weights widened
to fp32 first).
The reference is aten's linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OP_NAME = "llmbuild::linear"
VERSION = 1


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias)


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, w, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

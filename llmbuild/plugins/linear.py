"""`llmbuild::linear`: y = x @ w.T + bias, with a decode-sized bf16 kernel (csrc/linear.cpp).

Batches of at most 8 bf16 rows stream the weights through llmbuild's kernel (AVX512-BF16 dot products,
or AVX2 with bf16 widened by shifts); everything else, and CPUs below AVX2, run aten's linear (oneDNN).
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

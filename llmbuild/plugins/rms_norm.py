"""`llmbuild::rms_norm` and `llmbuild::add_rms_norm` (csrc/elementwise.cpp).

add_rms_norm(x, residual, w) returns (rms_norm(x + residual), x + residual): the residual add of a
decoder layer fused with the next norm. Rounding follows transformers: the sum is rounded to the
activation dtype, the normalised row is rounded before the weight multiply.
"""

from __future__ import annotations

import torch

OP_NAME = "llmbuild::rms_norm"
ADD_OP_NAME = "llmbuild::add_rms_norm"
VERSION = 1


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm_ref(total, weight, eps), total


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(ADD_OP_NAME)
    def _fake_add(x, residual, weight, eps):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, torch.empty_like(out)

"""`llmbuild::rope` (csrc/elementwise.cpp): rotary embedding with the table lookup fused in.

rope(x [T, H, D], positions [T], cos [L, D], sin [L, D]) with fp32 tables whose halves are
duplicated (builder/models/llama.py: rope_tables); the rotation is transformers' rotate_half form.
"""

from __future__ import annotations

import torch

OP_NAME = "llmbuild::rope"
VERSION = 1


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c = cos[positions].to(x.dtype).unsqueeze(1)
    s = sin[positions].to(x.dtype).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, positions, cos, sin):
        return x.new_empty(x.shape)

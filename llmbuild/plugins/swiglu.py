"""`llmbuild::swiglu` (csrc/elementwise.cpp): silu(gate) * up over a fused [gate | up] row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

OP_NAME = "llmbuild::swiglu"
VERSION = 1


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

"""`llmbuild::lora` (csrc/lora.cpp): a projection's output plus each token's LoRA adapter, picked per token.

The adapters of one fused projection sit in slot buffers (llmbuild/lora_layout.py): a [S, n*R, in],
b [S, R, out] (B transposed), ranks [S, n] int32, slot 0 = no adapter. For each token t with
s = slots[t] != 0 and each slice j (output columns off_j .. off_j + slices[j]) with r = ranks[s, j] > 0:

    out[t, off_j : off_j + slices[j]] = y[t, ...] + (x[t] @ a[s, j*R : j*R + r].T) @ b[s, :r, off_j : ...]

shrink and expand accumulate in fp32 (the shrink is not rounded to x's dtype), the sum with y is taken in
fp32 and rounded once to y's dtype. Every other element of out is y's, bit for bit: tokens of slot 0,
and slices of rank 0. The result is a new tensor, never y itself. The adapter's scale is folded into b.

b is stored transposed so that the expand reads contiguous output rows: each shrink value scales one row
b[s, k, off_j : off_j + slices[j]] into the token's output (an axpy), the shape a decode step wants.

The CPU kernel groups the step's tokens by slot; small steps (decode) run its own fp32 loops, each
adapter's A and B read once for all of its tokens, and larger ones (prefill) run each adapter's two GEMMs
at its own rank. A step with no adapter costs a scan of the slots and a copy of y. The Triton twin
(triton/lora.py) computes the same sums per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

OP_NAME = "llmbuild::lora"
VERSION = 2


def lora_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
    slices: Sequence[int],
) -> torch.Tensor:
    """The op's arithmetic token by token, in plain torch ops (see the module docstring)."""
    n = len(slices)
    rank_cap = a.shape[1] // n
    out = y.float()  # y -> fp32 -> y.dtype is exact: untouched elements come back bit for bit
    out = out.clone() if out is y else out
    for t, s in enumerate(slots.tolist()):
        if s == 0:
            continue
        off = 0
        for j, width in enumerate(slices):
            r = int(ranks[s, j])
            if r > 0:
                shrink = a[s, j * rank_cap : j * rank_cap + r].float() @ x[t].float()  # [r]
                out[t, off : off + width] += shrink @ b[s, :r, off : off + width].float()
            off += width
    return out.to(y.dtype)


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, y, a, b, ranks, slots, slices):
        return y.new_empty(y.shape)  # contiguous, as the kernels return it

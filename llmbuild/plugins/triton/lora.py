"""Triton kernels of llmbuild::lora (csrc/lora.cpp; contract and reference in ../lora.py).

Two launches after the copy of y, each reading the token's slot on the GPU (no host sync, so a step
stays CUDA-graph capturable):

    shrink  grid (T, n):               shrink[t, j, :r] = a[s, jR : jR + r] @ x[t]           (fp32)
    expand  grid (T, cdiv(out, BN)):   out[t, cols]     = round(y[t, cols] + shrink[t, j(col), :r] @ b[s, :r, cols])

Tokens of slot 0 return at once and rank-0 slices store nothing, so their rows stay the copy of y. Rows
beyond a slice's rank are masked off, never read: the sums run at each adapter's own rank. Fused
projections have at most three slices (lora_layout.PROJECTIONS); a column's slice is found by comparing
it with the two inner slice boundaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from llmbuild.plugins.triton.elementwise import _round

MAX_SLICES = 3


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, ranks_ptr, slots_ptr, shrink_ptr, k, n, rank_cap, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    s = tl.load(slots_ptr + t).to(tl.int64)
    r = tl.load(ranks_ptr + s * n + j)
    if s != 0 and r > 0:
        qs = tl.arange(0, BLOCK_R)
        ks = tl.arange(0, BLOCK_K)
        row_mask = qs < r
        rows = a_ptr + (s * n * rank_cap + j * rank_cap + qs)[:, None] * k  # a[s, jR + q, :]
        acc = tl.zeros([BLOCK_R], tl.float32)
        for k0 in range(0, k, BLOCK_K):
            k_mask = k0 + ks < k
            xk = tl.load(x_ptr + t * k + k0 + ks, mask=k_mask, other=0.0).to(tl.float32)
            ak = tl.load(rows + k0 + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(ak.to(tl.float32) * xk[None, :], axis=1)
        tl.store(shrink_ptr + (t * n + j) * rank_cap + qs, acc, mask=row_mask)


@triton.jit
def _expand_kernel(
    b_ptr,
    ranks_ptr,
    slots_ptr,
    shrink_ptr,
    out_ptr,
    width,
    n,
    rank_cap,
    bound1,
    bound2,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s = tl.load(slots_ptr + t).to(tl.int64)
    if s != 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < width
        j = (cols >= bound1).to(tl.int32) + (cols >= bound2).to(tl.int32)  # each column's slice
        r = tl.load(ranks_ptr + s * n + j, mask=col_mask, other=0)
        qs = tl.arange(0, BLOCK_R)
        mask = (qs[:, None] < r[None, :]) & col_mask[None, :]  # [BLOCK_R, BLOCK_N] tiles of b[s, q, cols]
        sh = tl.load(shrink_ptr + (t * n + j)[None, :] * rank_cap + qs[:, None], mask=mask, other=0.0)
        bq = tl.load(b_ptr + (s * rank_cap + qs)[:, None] * width + cols[None, :], mask=mask, other=0.0)
        delta = tl.sum(sh * bq.to(tl.float32), axis=0)
        yv = tl.load(out_ptr + t * width + cols, mask=col_mask, other=0.0)  # the copy of y
        out = _round(yv.to(tl.float32) + delta, out_ptr.dtype.element_ty)
        tl.store(out_ptr + t * width + cols, out, mask=col_mask & (r > 0))


def lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
    slices: list[int],
) -> torch.Tensor:
    """llmbuild::lora: y plus each token's adapter, x [T, in], y [T, out], slot buffers a, b, ranks."""
    n, (tokens, k), width = len(slices), x.shape, y.shape[1]
    if not 0 < n <= MAX_SLICES:
        raise ValueError(f"the Triton lora kernel takes 1 to {MAX_SLICES} slices (got {n})")
    rank_cap = a.shape[1] // n
    assert sum(slices) == width and y.shape[0] == tokens, f"lora: slices {slices} against y {tuple(y.shape)}"
    assert a.shape[2] == k and tuple(b.shape[1:]) == (rank_cap, width), f"lora: a {tuple(a.shape)}, b {tuple(b.shape)}"
    assert x.dtype == y.dtype == a.dtype == b.dtype, "lora: x, y, a, b must share a dtype"
    assert ranks.dtype == slots.dtype == torch.int32, "lora: ranks and slots must be int32"
    x, a, b, ranks, slots = x.contiguous(), a.contiguous(), b.contiguous(), ranks.contiguous(), slots.contiguous()
    out = y.clone(memory_format=torch.contiguous_format)
    shrink = torch.empty(tokens, n, rank_cap, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(rank_cap)
    block_k = min(triton.next_power_of_2(k), max(16, 4096 // block_r))
    wrap_triton(_shrink_kernel)[(tokens, n)](
        x, a, ranks, slots, shrink, k, n, rank_cap, BLOCK_R=block_r, BLOCK_K=block_k
    )
    bounds = [sum(slices[: i + 1]) for i in range(n - 1)] + [width] * (MAX_SLICES - n)
    block_n = min(triton.next_power_of_2(width), max(16, 4096 // block_r))
    wrap_triton(_expand_kernel)[(tokens, triton.cdiv(width, block_n))](
        b, ranks, slots, shrink, out, width, n, rank_cap, bounds[0], bounds[1], BLOCK_R=block_r, BLOCK_N=block_n
    )
    return out

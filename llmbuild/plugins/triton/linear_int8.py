"""Triton kernel of linear_int8 (csrc/linear_int8.cpp; format and reference in ../linear_int8.py):
a weight-only GEMM, y = (x @ w.T) * scales + bias, int8 weight tiles converted to the activation
dtype in registers.

int8 codes (-127..127) are exact in bf16 and fp16, so the tile products are exact and the per-row
scale can wait until the fp32 accumulator is done: one multiply per output, not one per weight.
(The reference dequantizes first, w * scale rounded to the activation dtype; the two differ by that
rounding only.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from llmbuild.plugins.triton.elementwise import _round

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # fp32 dots: see paged_attention.py's NOTE


@triton.jit
def _linear_int8_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    m,
    n,
    k,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: weight rows
    row_mask, col_mask = rows < m, cols < n
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        k_mask = k0 + ks < k
        x = tl.load(x_ptr + rows[:, None] * k + k0 + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * k + k0 + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0)
        w = w.to(tl.float32 if DOT_FP32 else x.dtype)
        if DOT_FP32:
            x = x.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    acc *= tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = _round(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])


def linear_int8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """llmbuild::linear_int8: x [..., K] against the int8 weight w [N, K] with one scale per row."""
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = x.new_empty((m, n))
    block_m, block_n = 16, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    wrap_triton(_linear_int8_kernel)[grid](
        x2, w, scales, bias if bias is not None else scales, out, m, n, k,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
        DOT_FP32=x.dtype == torch.float32 or _INTERPRET,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)

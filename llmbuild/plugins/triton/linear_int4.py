"""Triton kernel of linear_int4 (csrc/linear_int4.cpp; format and reference in ../linear_int4.py):
a GEMM that dequantizes the packed 4-bit weight tile by tile, y = x @ dequant(w).T + bias.

The packed layout stores each 64-column block of a row as 32 bytes, low nibbles columns 0..31 and
high nibbles 32..63, so a K step of 64 loads 32 bytes per row and runs two dots: the activations'
first 32 columns against the low nibbles, the next 32 against the high ones. Weights are
dequantized (q * scale + min, in fp32) and rounded to the activation dtype, as the reference's
dequantized matrix is.
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
def _linear_int4_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    mins_ptr,
    bias_ptr,
    out_ptr,
    m,
    n,
    k,
    HAS_BIAS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: weight rows
    row_mask, col_mask = rows < m, cols < n
    half = tl.arange(0, 32)
    groups = k // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, k // 64):
        packed = tl.load(w_ptr + cols[:, None] * (k // 2) + kb * 32 + half[None, :], mask=col_mask[:, None], other=0)
        x_lo = tl.load(x_ptr + rows[:, None] * k + kb * 64 + half[None, :], mask=row_mask[:, None], other=0.0)
        x_hi = tl.load(x_ptr + rows[:, None] * k + kb * 64 + 32 + half[None, :], mask=row_mask[:, None], other=0.0)
        dtype = x_lo.dtype
        g_lo, g_hi = (kb * 64) // GROUP, (kb * 64 + 32) // GROUP
        s_lo = tl.load(scales_ptr + cols * groups + g_lo, mask=col_mask, other=0.0).to(tl.float32)
        m_lo = tl.load(mins_ptr + cols * groups + g_lo, mask=col_mask, other=0.0).to(tl.float32)
        s_hi = tl.load(scales_ptr + cols * groups + g_hi, mask=col_mask, other=0.0).to(tl.float32)
        m_hi = tl.load(mins_ptr + cols * groups + g_hi, mask=col_mask, other=0.0).to(tl.float32)
        w_lo = _round((packed & 0x0F).to(tl.float32) * s_lo[:, None] + m_lo[:, None], dtype)
        w_hi = _round((packed >> 4).to(tl.float32) * s_hi[:, None] + m_hi[:, None], dtype)
        if DOT_FP32:
            x_lo, x_hi, w_lo, w_hi = x_lo.to(tl.float32), x_hi.to(tl.float32), w_lo.to(tl.float32), w_hi.to(tl.float32)
        acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
        acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = _round(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])


def linear_int4(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """llmbuild::linear_int4: x [..., K] against the packed weight w uint8 [N, K/2]."""
    n, k = w.shape[0], w.shape[1] * 2
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = x.new_empty((m, n))
    block_n = 64
    grid = (triton.cdiv(m, 16), triton.cdiv(n, block_n))
    wrap_triton(_linear_int4_kernel)[grid](
        x2, w, scales, mins, bias if bias is not None else scales, out, m, n, k,
        HAS_BIAS=bias is not None, GROUP=k // scales.shape[1], BLOCK_M=16, BLOCK_N=block_n,
        DOT_FP32=x.dtype == torch.float32 or _INTERPRET,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)

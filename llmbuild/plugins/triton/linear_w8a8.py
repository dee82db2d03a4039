"""Triton kernels of linear_w8a8 (csrc/linear_w8a8.cpp; semantics and reference in ../linear_w8a8.py):
per-token int8 quantization of x, then an int8 x int8 GEMM on the tensor cores (tl.dot into int32)
with the two scales and the bias applied to the finished sums.

The codes and the int32 sums are exactly the CPU kernel's. The fp32 epilogue keeps the reference's
order, (acc * x_scale) * w_scale + bias; a GPU compiler may fuse the last multiply-add into an fma, so
there outputs can differ from the reference by that one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from llmbuild.plugins.triton.elementwise import _round

# 1.5 * 2**23: adding and subtracting it rounds |x| < 2**22 to an integer, half to even. A constexpr: compiled
# kernels may read no other kind of global (the interpreter does not check)
_ROUNDING = tl.constexpr(12582912.0)


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scales_ptr, k, BLOCK_K: tl.constexpr):
    """One row of x per program: codes round(x * (127 / amax)) (half to even), scale amax / 127."""
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        x = tl.load(x_ptr + row * k + k0 + ks, mask=k0 + ks < k, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    top = tl.max(amax, axis=0)
    inv = tl.where(top > 0, tl.math.div_rn(127.0, tl.maximum(top, 1e-30)), 0.0)
    for k0 in range(0, k, BLOCK_K):
        mask = k0 + ks < k
        x = tl.load(x_ptr + row * k + k0 + ks, mask=mask, other=0.0).to(tl.float32)
        # the clamp (a no-op: |x| <= amax) also keeps the multiply from fusing into the rounding add
        y = tl.minimum(tl.maximum(x * inv, -127.0), 127.0)
        tl.store(codes_ptr + row * k + k0 + ks, ((y + _ROUNDING) - _ROUNDING).to(tl.int8), mask=mask)
    tl.store(scales_ptr + row, tl.math.div_rn(top, 127.0))


@triton.jit
def _int8_gemm_kernel(
    codes_ptr,
    x_scales_ptr,
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
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: weight rows
    row_mask, col_mask = rows < m, cols < n
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, k, BLOCK_K):
        k_mask = k0 + ks < k
        x = tl.load(codes_ptr + rows[:, None] * k + k0 + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_ptr + cols[:, None] * k + k0 + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    x_scale = tl.load(x_scales_ptr + rows, mask=row_mask, other=0.0)
    w_scale = tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = (acc.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = _round(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])


def linear_w8a8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """llmbuild::linear_w8a8: x [..., K] quantized per token, against the int8 weight w [N, K] (per-row scales)."""
    n, k = w.shape
    assert w.dtype == torch.int8 and x.shape[-1] == k, f"linear_w8a8: x {tuple(x.shape)} against w {tuple(w.shape)}"
    assert scales.shape == (n,) and scales.dtype == x.dtype, "linear_w8a8: scales must be [N] in x's dtype"
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    x_scales = torch.empty((m,), dtype=torch.float32, device=x.device)
    out = x.new_empty((m, n))
    if m > 0:
        wrap_triton(_quantize_rows_kernel)[(m,)](x2, codes, x_scales, k, BLOCK_K=1024)
        block_m, block_n = (16, 64) if m <= 16 else (64, 128)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        wrap_triton(_int8_gemm_kernel)[grid](
            codes, x_scales, w, scales, bias if bias is not None else scales, out, m, n, k,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)

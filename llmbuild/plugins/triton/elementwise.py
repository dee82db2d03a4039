"""Triton kernels of the fused elementwise ops (csrc/elementwise.cpp): rms_norm, add_rms_norm,
swiglu and rope. One program per row (token); rounding to the activation dtype where the torch
references round (see ../rms_norm.py, ../swiglu.py, ../rope.py), so bf16 results match them bit
for bit up to the order of the squares' sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounded to nearest even as torch rounds.

    NOTE: bf16 by hand: Triton's interpreter (how CI runs these kernels) truncates fp32 -> bf16
    where GPUs round; the integer form rounds the same on both.
    """
    if dtype == tl.float32:
        return x
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # AOTInductor passes Python floats as fp64, which would carry into the math
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if ADD:  # the residual add, rounded to the activation dtype as the reference's x + residual is
        x = _round(x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32), dtype)
        tl.store(sum_ptr + row * n + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    normed = _round(x32 * tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / n + eps), dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n + cols, _round(normed.to(tl.float32) * w.to(tl.float32), dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llmbuild::rms_norm for x [..., n] (contiguous rows)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    wrap_triton(_rms_norm_kernel)[(x.numel() // n,)](x, x, weight, out, out, n, eps, ADD=False, BLOCK=block)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """llmbuild::add_rms_norm: (rms_norm(x + residual), x + residual)."""
    x, residual = x.contiguous(), residual.contiguous()
    out, total = torch.empty_like(x), torch.empty_like(x)
    n = x.shape[-1]
    grid = (x.numel() // n,)
    block = triton.next_power_of_2(n)
    wrap_triton(_rms_norm_kernel)[grid](x, residual, weight, out, total, n, eps, ADD=True, BLOCK=block)
    return out, total


@triton.jit
def _swiglu_kernel(gate_up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_up_ptr + row * 2 * n + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * n + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), gate.dtype)
    tl.store(out_ptr + row * n + cols, _round(silu.to(tl.float32) * up.to(tl.float32), gate.dtype), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """llmbuild::swiglu: silu(gate) * up over rows [gate | up] of width 2n."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], n))
    block = min(1024, triton.next_power_of_2(n))
    wrap_triton(_swiglu_kernel)[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, heads, D: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    base = (token * heads + head) * D
    pos = tl.load(pos_ptr + token)
    cols = tl.arange(0, HALF)
    lo = tl.load(x_ptr + base + cols)
    hi = tl.load(x_ptr + base + HALF + cols)
    dtype = lo.dtype
    # tables duplicate their halves: cos[p, i] == cos[p, i + HALF]
    c = _round(tl.load(cos_ptr + pos * D + cols), dtype).to(tl.float32)
    s = _round(tl.load(sin_ptr + pos * D + cols), dtype).to(tl.float32)
    lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
    # x * c + rotate_half(x) * s, each product rounded as the reference rounds it
    out_lo = _round(_round(lo32 * c, dtype).to(tl.float32) + _round(-hi32 * s, dtype).to(tl.float32), dtype)
    out_hi = _round(_round(hi32 * c, dtype).to(tl.float32) + _round(lo32 * s, dtype).to(tl.float32), dtype)
    tl.store(out_ptr + base + cols, out_lo)
    tl.store(out_ptr + base + HALF + cols, out_hi)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llmbuild::rope for x [T, H, D] (D a power of two), positions [T], fp32 tables [L, D]."""
    x = x.contiguous()
    t, heads, d = x.shape
    if d & (d - 1):
        raise ValueError(f"the Triton rope kernel needs a power-of-two head_dim (got {d})")
    out = torch.empty_like(x)
    cos, sin = cos.contiguous(), sin.contiguous()
    wrap_triton(_rope_kernel)[(t, heads)](x, positions, cos, sin, out, heads, D=d, HALF=d // 2)
    return out

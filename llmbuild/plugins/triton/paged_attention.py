"""Triton kernels of paged_attention and quantized_paged_attention (csrc/paged_attention.cpp; layout,
metadata and references in ../paged_attention.py).

Two kernels per call: one writes the step's K/V at slot_mapping (quantizing for an int8 or fp8 cache),
then one attends for every token of the packed step, decode and prefill alike (flash-attention
style: online softmax over key tiles, gathered through the block table position by position, so
any block size and any scattered block table work).

A program owns one kv head and a tile of BLOCK_Q consecutive query tokens of one sequence, with
the GROUP query heads that read that kv head stacked into its rows (rows = token x group head):
a decode token's group heads fill a tile alone, so GQA reads each cached K/V tile once for the
whole group. Programs find their sequence by binary search over cu_seqlens_q: sequence b's tiles
start at program cu_seqlens_q[b] // BLOCK_Q + b, which bounds the grid at T // BLOCK_Q + B
programs without reading the metadata on the host (no device sync, graph-capturable).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from llmbuild.plugins.triton.elementwise import _round

# NOTE: the interpreter's tl.dot multiplies bf16 bit patterns (numpy has no bf16): interpreted,
# the dots take fp32 inputs holding the same bf16 values; GPUs take bf16 into the tensor cores.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# 1.5 * 2**23: adding and subtracting it rounds |x| < 2**22 to an integer, half to even. A constexpr: compiled
# kernels may read no other kind of global (the interpreter does not check)
_ROUNDING = tl.constexpr(12582912.0)


@triton.jit
def _quantize(x, head_scale, codes: tl.constexpr):
    """fp32 -> int8 or e4m3 codes as quantize_kv: x / scale, saturated to [-127, 127] or [-448, 448],
    rounded half to even."""
    y = tl.math.div_rn(x, head_scale)
    if codes == tl.int8:
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        return ((y + _ROUNDING) - _ROUNDING).to(tl.int8)
    # e4m3: rounded here onto its grid (3 mantissa bits; below 2^-6 a fixed step of 2^-9), so that the
    # conversion is exact: the interpreter's fp32 -> fp8 conversion misrounds carries and subnormals
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return (((y / step + _ROUNDING) - _ROUNDING) * step).to(codes)


@triton.jit
def _write_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    scales_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QUANTIZED: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token, head = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    dst = ((slot // BLOCK_SIZE * NUM_KV_HEADS + head) * BLOCK_SIZE + slot % BLOCK_SIZE) * HEAD_DIM
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
    if QUANTIZED:
        k = _quantize(k.to(tl.float32), tl.load(scales_ptr + head), k_cache_ptr.dtype.element_ty)
        v = _quantize(v.to(tl.float32), tl.load(scales_ptr + NUM_KV_HEADS + head), v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + dst + d, k, mask=mask)
    tl.store(v_cache_ptr + dst + d, v, mask=mask)


@triton.jit
def _attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    table_ptr,
    lens_ptr,
    cu_ptr,
    scales_ptr,
    scale,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_table,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    QUANTIZED: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    GROUP_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # AOTInductor passes Python floats as fp64, which would carry into the scores
    pid, g = tl.program_id(0), tl.program_id(1)
    # the sequence whose tiles this program falls among: largest b with cu[b] // BLOCK_Q + b <= pid
    lo, hi = 0, num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid
        else:
            hi = mid
    b = lo
    q_start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - q_start
    t0 = (pid - (q_start // BLOCK_Q + b)) * BLOCK_Q
    if t0 < n:
        ctx_len = tl.load(lens_ptr + b)
        rows = tl.arange(0, BLOCK_Q * GROUP_P)
        tok = t0 + rows // GROUP_P
        head = g * GROUP + rows % GROUP_P
        valid = (tok < n) & (rows % GROUP_P < GROUP)
        q_pos = tl.where(valid, ctx_len - n + tok, -1)  # invalid rows see no key
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q_offsets = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_offsets, mask=valid[:, None] & d_mask[None, :], other=0.0)
        dtype = q.dtype
        if DOT_FP32:
            q = q.to(tl.float32)
        if QUANTIZED:
            k_scale = tl.load(scales_ptr + g)
            v_scale = tl.load(scales_ptr + NUM_KV_HEADS + g)

        m_i = tl.full([BLOCK_Q * GROUP_P], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_P, BLOCK_D], tl.float32)
        end = tl.minimum(ctx_len, ctx_len - n + t0 + BLOCK_Q)  # causal: the tile's last query position + 1
        for start in range(0, end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            in_ctx = pos < end
            block = tl.load(table_ptr + b * stride_table + pos // BLOCK_SIZE, mask=in_ctx, other=0)
            kv_rows = ((block * NUM_KV_HEADS + g) * BLOCK_SIZE + pos % BLOCK_SIZE) * HEAD_DIM
            kv_mask = in_ctx[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if QUANTIZED:  # dequantized to the activation dtype, as the reference's cache is
                k = _round(k.to(tl.float32) * k_scale, dtype)
                v = _round(v.to(tl.float32) * v_scale, dtype)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where((pos[None, :] <= q_pos[:, None]) & in_ctx[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(_round(p, v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = _round(acc / tl.maximum(l_i, 1e-30)[:, None], dtype)
        tl.store(out_ptr + q_offsets, out, mask=valid[:, None] & d_mask[None, :])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_scales: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """paged_attention (kv_scales None) or quantized_paged_attention (int8 or fp8 caches, kv_scales [2, H_kv]
    fp32): q [T, H, D], k/v [T, H_kv, D] with head_dim contiguous; mutates the caches."""
    t, h, d = q.shape
    _, hkv, block_size, _ = k_cache.shape
    b = seq_lens.shape[0]
    quantized = kv_scales is not None
    scales = kv_scales if kv_scales is not None else q  # an unused pointer when not quantized
    block_d = max(16, triton.next_power_of_2(d))
    wrap_triton(_write_cache_kernel)[(t, hkv)](
        k, v, k_cache, v_cache, slot_mapping, scales, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=hkv, BLOCK_SIZE=block_size, HEAD_DIM=d, QUANTIZED=quantized, BLOCK_D=block_d,
    )  # fmt: skip
    group = h // hkv
    group_p = triton.next_power_of_2(group)
    # a decode-only step (one token per sequence, known from the shapes) fills tiles with group heads;
    # prompt chunks take 64-row tiles (and at least 16 rows: tl.dot's minimum on GPUs)
    block_q = 1 if t == b else max(1, 64 // group_p)
    block_q = max(block_q, triton.cdiv(16, group_p))
    out = torch.empty_like(q)
    wrap_triton(_attention_kernel)[(t // block_q + b, hkv)](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, scales, scale, b,
        q.stride(0), q.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=hkv, BLOCK_SIZE=block_size, HEAD_DIM=d, GROUP=group, QUANTIZED=quantized,
        BLOCK_Q=block_q, GROUP_P=group_p, BLOCK_N=64, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT_FP32=q.dtype == torch.float32 or _INTERPRET,
    )  # fmt: skip
    return out

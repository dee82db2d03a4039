"""`llmbuild::paged_attention`: write the step's K/V into the paged cache, then attend through it.

Schema and CPU kernel: csrc/library.cpp, csrc/paged_attention.cpp. Here: the torch reference and
the fake kernel used for tracing.

One call serves a packed batch that mixes prefill, chunked prefill and decode:

    packed step      |-- seq 0: 5 new tokens --|-- seq 1: 1 token --|-- seq 2: 3 tokens --|
    cu_seqlens_q     0                         5                    6                     9
    seq_lens         [ 5 (fresh prompt),         40 (decode),         19 (chunk 16..18) ]

Sequence b owns the packed rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its n new tokens sit at
positions seq_lens[b]-n .. seq_lens[b]-1, and token j attends to cache positions 0 .. seq_lens[b]-n+j
(causal within the step, full over what is already cached). Position p of sequence b lives in
cache block block_tables[b, p // block_size] at offset p % block_size; slot_mapping gives the
flat slot (block * block_size + offset) each new token writes.

Cache layout: [num_blocks, num_kv_heads, block_size, head_dim], so one head of one block is
contiguous. Grouped-query attention: query head h reads kv head h // (num_heads // num_kv_heads).

`quantized_paged_attention` is the same op over an int8 or fp8 (e4m3) cache: K and V are stored as
x / scale rounded (half to even) to int8 in [-127, 127] or to e4m3 in [-448, 448], saturated, one
scale per kv head for K and one for V (kv_scales [2, H_kv] fp32, calibrated at build time:
builder/kv_quant.py), and read back as code * scale. Every query attends to the cache's values, its
own step's tokens included, so a prompt prefilled in one step or in chunks sees the same keys.

NOTE: each layer passes its own cache tensors. Passing views of one stacked cache (cache[i]) into
this mutating op miscompiles under dynamic shapes (pytorch issue 198068: every layer writes layer 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OP_NAME = "llmbuild::paged_attention"
VERSION = 1
QUANTIZED_OP_NAME = "llmbuild::quantized_paged_attention"
QUANTIZED_VERSION = 1
INT8_MAX = 127
CODE_MAX = {torch.int8: INT8_MAX, torch.float8_e4m3fn: 448}
"""Largest code of each quantized cache dtype."""


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
) -> None:
    """Reject inconsistent shapes and dtypes with a message instead of a wrong tensor."""
    t, h, d = q.shape
    _, hkv, bs, dc = k_cache.shape
    if k.shape != (t, hkv, d) or v.shape != (t, hkv, d):
        raise ValueError(f"paged_attention: k/v must be [{t}, {hkv}, {d}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if dc != d or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"paged_attention: cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit head_dim {d}"
        )
    if h % hkv:
        raise ValueError(f"paged_attention: {h} query heads is not a multiple of {hkv} kv heads")
    if k_cache.dtype != k.dtype or v_cache.dtype != v.dtype:
        raise ValueError(f"paged_attention: cache dtype {k_cache.dtype} != k/v dtype {k.dtype}")
    b = seq_lens.shape[0]
    if slot_mapping.shape != (t,) or cu_seqlens_q.shape != (b + 1,) or block_tables.shape[0] != b:
        raise ValueError(
            f"paged_attention: metadata shapes slot_mapping {tuple(slot_mapping.shape)}, "
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)}, block_tables {tuple(block_tables.shape)} "
            f"do not fit {t} tokens in {b} sequences"
        )


def write_kv_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's k, v [T, H_kv, D] at their flat cache slots (block * block_size + offset)."""
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    # Advanced indices split by a slice put the token dim first: the target is [T, H_kv, D].
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def paged_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference: scatter K/V into the cache, then per-sequence SDPA over gathered blocks.

    q: [T, H, D]; k, v: [T, H_kv, D]; returns [T, H, D]. Mutates k_cache and v_cache.
    """
    check_inputs(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    write_kv_cache(k_cache, v_cache, k, v, slot_mapping)

    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for b, ctx_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        n = q_end - q_start
        if n == 0:
            continue
        n_blocks = -(-ctx_len // block_size)
        table = block_tables[b, :n_blocks].long()
        # [n_blocks, H_kv, bs, D] -> [H_kv, n_blocks * bs, D] -> first ctx_len positions
        keys = k_cache[table].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :ctx_len]
        values = v_cache[table].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :ctx_len]
        # A fresh prompt is plain causal and a decode token sees everything: SDPA's own forms for
        # those (as transformers uses) keep bf16 results bit-identical to it. Only a chunk that
        # continues a cached prefix needs the offset mask: query j sits at position ctx_len - n + j.
        causal, mask = n == ctx_len and n > 1, None
        if 1 < n < ctx_len:
            mask = torch.ones(n, ctx_len, dtype=torch.bool).tril(diagonal=ctx_len - n)
        o = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def quantize_kv(x: torch.Tensor, head_scales: torch.Tensor, codes: torch.dtype = torch.int8) -> torch.Tensor:
    """int8 or e4m3 codes of x [..., H_kv, D] with one fp32 scale per kv head: round half to even, saturated."""
    y = x.float() / head_scales[:, None]
    if codes == torch.int8:
        y = y.round()
    return y.clamp(-CODE_MAX[codes], CODE_MAX[codes]).to(codes)


def dequantize_kv(codes: torch.Tensor, head_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values codes [..., H_kv, block_size, D] stand for, in `dtype` (scaled in fp32)."""
    return (codes.float() * head_scales[:, None, None]).to(dtype)


def quantized_paged_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_scales: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch reference over int8 or fp8 caches: store the step's quantized K/V, then paged_attention_ref
    on the dequantized caches (the step's own K/V included, as the cache holds them)."""
    if k_cache.dtype not in CODE_MAX or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"quantized_paged_attention: caches must be int8 or float8_e4m3fn, got {k_cache.dtype}")
    if kv_scales.shape != (2, k_cache.shape[1]) or kv_scales.dtype != torch.float32:
        raise ValueError(
            f"quantized_paged_attention: kv_scales must be float32 [2, {k_cache.shape[1]}], "
            f"got {kv_scales.dtype} {tuple(kv_scales.shape)}"
        )
    k_scales, v_scales = kv_scales
    k_codes, v_codes = quantize_kv(k, k_scales, k_cache.dtype), quantize_kv(v, v_scales, v_cache.dtype)
    write_kv_cache(k_cache, v_cache, k_codes, v_codes, slot_mapping)
    return paged_attention_ref(
        q,
        (k_codes.float() * k_scales[:, None]).to(q.dtype),
        (v_codes.float() * v_scales[:, None]).to(q.dtype),
        dequantize_kv(k_cache, k_scales, q.dtype),
        dequantize_kv(v_cache, v_scales, q.dtype),
        slot_mapping,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        scale,
    )


def register_fake_kernel() -> None:
    """Shape-only kernels for tracing (torch.export / AOTInductor)."""

    @torch.library.register_fake(OP_NAME)
    def _fake(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, scale):
        return torch.empty_like(q)

    @torch.library.register_fake(QUANTIZED_OP_NAME)
    def _fake_quantized(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, kv_scales, s):
        return torch.empty_like(q)

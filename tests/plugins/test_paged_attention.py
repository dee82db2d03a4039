"""paged_attention against dense causal attention over each sequence's full K/V."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.paged_attention import paged_attention_ref

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 16, 4, 32


def dense_attention(q, k, v, scale):
    """q: [n, H, D] for the last n positions of a sequence whose full k, v are [L, H_kv, D]."""
    n, length = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // HKV, dim=1).float()
    v = v.repeat_interleave(H // HKV, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos_q = torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_case(dtype, ctx_lens=(5, 20, 12), new_tokens=(5, 1, 3), seed=0):
    """A packed step mixing a fresh prompt, a decode and a continued chunk, with scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(NUM_BLOCKS, HKV, BS, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()  # non-contiguous block tables
    max_blocks = 8
    tables, full_k, full_v, q_parts, k_new, v_new, slots = [], [], [], [], [], [], []
    for length, n in zip(ctx_lens, new_tokens, strict=True):
        blocks = [free.pop() for _ in range(-(-length // BS))]
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
        k = torch.randn(length, HKV, D, generator=g).to(dtype)
        v = torch.randn(length, HKV, D, generator=g).to(dtype)
        for p in range(length - n):  # the already-cached prefix
            k_cache[blocks[p // BS], :, p % BS] = k[p]
            v_cache[blocks[p // BS], :, p % BS] = v[p]
        full_k.append(k)
        full_v.append(v)
        q_parts.append(torch.randn(n, H, D, generator=g).to(dtype))
        k_new.append(k[length - n :])
        v_new.append(v[length - n :])
        slots += [blocks[p // BS] * BS + p % BS for p in range(length - n, length)]
    cu = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32)
    args = (
        torch.cat(q_parts),
        torch.cat(k_new),
        torch.cat(v_new),
        k_cache,
        v_cache,
        torch.tensor(slots),
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(ctx_lens, dtype=torch.int32),
        cu,
    )
    return args, full_k, full_v, q_parts


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("impl", ["reference", "op"])
def test_matches_dense_attention_on_a_mixed_step(dtype, tol, impl):
    args, full_k, full_v, q_parts = make_case(dtype)
    scale = D**-0.5
    fn = paged_attention_ref if impl == "reference" else torch.ops.llmbuild.paged_attention
    out = fn(*args, scale)
    cu = args[8].tolist()
    for b, (k, v, q) in enumerate(zip(full_k, full_v, q_parts, strict=True)):
        expected = dense_attention(q, k, v, scale)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]].float(), expected, atol=tol, rtol=tol)
    # the step's K/V landed in the cache at slot_mapping
    k_cache, slots = args[3], args[5]
    written = k_cache[slots // BS, :, slots % BS]
    torch.testing.assert_close(written, args[1])


def test_bad_shapes_fail_with_a_message():
    args, *_ = make_case(torch.float32)
    bad = list(args)
    bad[1] = bad[1][:, :1]  # k with the wrong number of kv heads
    with pytest.raises(ValueError, match="k/v must be"):
        paged_attention_ref(*bad, 1.0)
    bad = list(args)
    bad[8] = bad[8][:-1]  # cu_seqlens_q too short
    with pytest.raises(ValueError, match="metadata shapes"):
        paged_attention_ref(*bad, 1.0)


def test_opcheck():
    args, *_ = make_case(torch.float32)
    torch.library.opcheck(torch.ops.llmbuild.paged_attention.default, (*args, D**-0.5))

"""paged_attention against dense causal attention over each sequence's full K/V."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.paged_attention import (
    paged_attention_ref,
    quantized_paged_attention_ref,
    write_kv_cache,
)
from tests.helpers import BS, HKV, D, make_case, quantized_case


def dense_attention(q, k, v, scale):
    """q: [n, H, D] for the last n positions of a sequence whose full k, v are [L, H_kv, D]."""
    n, length = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos_q = torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("impl", ["reference", "op"])
def test_matches_dense_attention_on_a_mixed_step(kernel_isa, dtype, tol, impl):
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


@pytest.mark.parametrize("head_dim", [16, 64, 24, 20])  # 24: three 8-lane vectors; 20: the portable loop
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_decode_batch_matches_dense_attention(kernel_isa, head_dim, dtype, tol):
    # contexts around the decode kernel's 8- and 16-position vectors: 1, exactly 16, one past, several
    ctx = (1, 16, 17, 40, 97)
    args, full_k, full_v, q_parts = make_case(
        dtype, ctx_lens=ctx, new_tokens=(1,) * len(ctx), heads=(8, 2), num_blocks=64, head_dim=head_dim
    )
    scale = head_dim**-0.5
    out = torch.ops.llmbuild.paged_attention(*args, scale)
    for b, (k, v, q) in enumerate(zip(full_k, full_v, q_parts, strict=True)):
        torch.testing.assert_close(out[b : b + 1].float(), dense_attention(q, k, v, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [64, 20])  # 20: the portable loop
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_few_new_tokens_on_a_cached_context_match_dense_attention(kernel_isa, head_dim, dtype, tol):
    # a speculative step: the last token and its proposals (2 .. 17 new tokens: the decode kernel) and an
    # 18-token chunk (SDPA), each over a cached context crossing block borders
    new = (2, 5, 9, 17, 18)
    ctx = (3, 21, 40, 33, 50)
    args, full_k, full_v, q_parts = make_case(
        dtype, ctx_lens=ctx, new_tokens=new, heads=(8, 2), num_blocks=64, head_dim=head_dim
    )
    scale = head_dim**-0.5
    out = torch.ops.llmbuild.paged_attention(*args, scale)
    cu = args[8].tolist()
    for b, (k, v, q) in enumerate(zip(full_k, full_v, q_parts, strict=True)):
        expected = dense_attention(q, k, v, scale)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("n", [5, 17])  # 17: the last token and the most proposals a recipe allows (16)
@pytest.mark.parametrize("head_dim", [64, 20])
def test_each_of_a_few_new_tokens_is_computed_as_a_decode_token_at_its_position(kernel_isa, head_dim, n):
    # speculation is lossless only if checking a proposal computes what decoding that token would: token j of an
    # n-token step must equal, bit for bit, a decode step of that token over the context up to it
    length = 37
    args, *_ = make_case(
        torch.bfloat16, ctx_lens=(length,), new_tokens=(n,), heads=(8, 2), num_blocks=16, head_dim=head_dim
    )
    q, k, v, k_cache, v_cache, slots, tables, _, _ = args
    scale = head_dim**-0.5
    together = torch.ops.llmbuild.paged_attention(*[a.clone() for a in args], scale)
    for j in range(n):
        one = torch.ops.llmbuild.paged_attention(
            q[j : j + 1],
            k[j : j + 1],
            v[j : j + 1],
            k_cache,  # the earlier new tokens were written by the previous iterations
            v_cache,
            slots[j : j + 1],
            tables,
            torch.tensor([length - n + 1 + j], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32),
            scale,
        )
        assert torch.equal(one[0], together[j]), f"new token {j}"


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


CODES = [torch.int8, torch.float8_e4m3fn]


@pytest.mark.parametrize("codes", CODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_op_matches_its_reference(kernel_isa, dtype, codes):
    args, kv_scales, *_ = quantized_case(dtype, codes)
    scale = D**-0.5
    ref_args = [a.clone() for a in args]
    expected = quantized_paged_attention_ref(*ref_args, kv_scales, scale)
    out = torch.ops.llmbuild.quantized_paged_attention(*args, kv_scales, scale)
    # both caches hold the same codes afterwards, the step's tokens quantized identically
    assert torch.equal(args[3].view(torch.int8), ref_args[3].view(torch.int8))
    assert torch.equal(args[4].view(torch.int8), ref_args[4].view(torch.int8))
    cu = args[8].tolist()
    # the fresh prompt: SDPA on identical dequantized inputs
    torch.testing.assert_close(out[: cu[1]], expected[: cu[1]], atol=0, rtol=0)
    # the decode token and the 3-token chunk: the decode kernel scales in fp32 without rounding the dequantized
    # cache to the activation dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[cu[1] :].float(), expected[cu[1] :].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("codes", CODES)
@pytest.mark.parametrize("head_dim", [64, 24, 20])
def test_quantized_decode_batch_matches_its_reference(kernel_isa, head_dim, codes):
    ctx = (1, 16, 17, 40, 97)
    args, kv_scales, *_ = quantized_case(
        torch.float32, codes, ctx_lens=ctx, new_tokens=(1,) * len(ctx), heads=(8, 2), num_blocks=64, head_dim=head_dim
    )
    scale = head_dim**-0.5
    expected = quantized_paged_attention_ref(*[a.clone() for a in args], kv_scales, scale)
    out = torch.ops.llmbuild.quantized_paged_attention(*args, kv_scales, scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("codes,bound", [(torch.int8, 0.03), (torch.float8_e4m3fn, 0.1)])
def test_quantized_op_is_close_to_exact_attention(codes, bound):
    args, kv_scales, full_k, full_v, q_parts = quantized_case(torch.float32, codes)
    scale = D**-0.5
    out = torch.ops.llmbuild.quantized_paged_attention(*args, kv_scales, scale)
    cu = args[8].tolist()
    for b, (k, v, q) in enumerate(zip(full_k, full_v, q_parts, strict=True)):
        exact = dense_attention(q, k, v, scale)
        err = (out[cu[b] : cu[b + 1]] - exact).abs().max().item()
        assert 0 < err < bound  # quantization error: present, and small against values of size ~1


def test_quantized_writes_saturate_beyond_the_scale():
    args, kv_scales, *_ = quantized_case(torch.float32)
    k = args[1].clone()
    k[0, 0, :4] = torch.tensor([1e6, -1e6, 0.5 * kv_scales[0, 0].item(), 1.5 * kv_scales[0, 0].item()])
    args = (args[0], k, *args[2:])
    torch.ops.llmbuild.quantized_paged_attention(*args, kv_scales, D**-0.5)
    slot = args[5][0].item()
    codes = args[3][slot // BS, 0, slot % BS, :4].tolist()
    assert codes == [127, -127, 0, 2]  # saturated both ways; halves round to even


def test_fp8_writes_saturate_and_round_half_to_even():
    args, kv_scales, *_ = quantized_case(torch.float32, torch.float8_e4m3fn)
    s = kv_scales[0, 0].item()
    k = args[1].clone()
    # 1.0625 lies halfway between e4m3's 1.0 and 1.125 (mantissa 000 and 001): even wins
    k[0, 0, :5] = torch.tensor([1e6, -1e6, 0.5 * s, 1.0625 * s, 1.1875 * s])
    args = (args[0], k, *args[2:])
    torch.ops.llmbuild.quantized_paged_attention(*args, kv_scales, D**-0.5)
    slot = args[5][0].item()
    codes = args[3][slot // BS, 0, slot % BS, :5].float().tolist()
    assert codes == [448, -448, 0.5, 1.0, 1.25]


def test_quantized_op_rejects_bad_scales_and_caches():
    args, kv_scales, *_ = quantized_case(torch.float32)
    with pytest.raises(RuntimeError, match=r"kv_scales must be contiguous float32 \[2, 2\]"):
        torch.ops.llmbuild.quantized_paged_attention(*args, kv_scales[:, :1].contiguous(), 1.0)
    with pytest.raises(ValueError, match=r"kv_scales must be float32 \[2, 2\]"):
        quantized_paged_attention_ref(*args, kv_scales.double(), 1.0)
    plain, *_ = make_case(torch.float32)
    with pytest.raises(RuntimeError, match="caches must be int8"):
        torch.ops.llmbuild.quantized_paged_attention(*plain, kv_scales, 1.0)


def test_quantized_opcheck():
    args, kv_scales, *_ = quantized_case(torch.float32)
    torch.library.opcheck(torch.ops.llmbuild.quantized_paged_attention.default, (*args, kv_scales, D**-0.5))


def test_write_kv_cache_stores_each_token_at_its_slot():
    k_cache, v_cache = torch.zeros(3, HKV, BS, D), torch.zeros(3, HKV, BS, D)
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    slots = torch.tensor([2 * BS + 1, 0, BS - 1])  # block 2 offset 1, block 0 offset 0, block 0 last
    write_kv_cache(k_cache, v_cache, k, v, slots)
    for token, (block, offset) in enumerate([(2, 1), (0, 0), (0, BS - 1)]):
        assert torch.equal(k_cache[block, :, offset], k[token]) and torch.equal(v_cache[block, :, offset], v[token])
    assert k_cache.count_nonzero() == k.count_nonzero() and v_cache.count_nonzero() == v.count_nonzero()

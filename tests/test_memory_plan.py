"""KV-cache sizing, and the memory plan as an engine's report records it."""

from __future__ import annotations

from llmbuild.memory_plan import largest_step_tokens, plan_memory, step_activation_bytes
from llmbuild.recipe import EngineLimits, KVCacheSection
from tests.helpers import config


def test_default_budget_holds_max_batch_size_full_sequences_and_the_report_says_so():
    limits = EngineLimits(max_batch_size=3, max_seq_len=100, max_num_tokens=100)
    plan = plan_memory(
        weight_bytes=1000,
        kv_bytes_per_token=8,
        limits=limits,
        kv_cache=KVCacheSection(block_size=16),
        available_bytes=None,
    )
    # 100 tokens take 7 blocks of 16 tokens, 128 bytes each
    assert plan.as_report() == {
        "weight_bytes": 1000,
        "kv_bytes_per_token": 8,
        "kv_budget_bytes": 3 * 7 * 128,
        "kv_blocks": 21,
        "blocks_per_sequence": 7,
        "max_full_sequences": 3,
    }


def test_an_explicit_budget_sets_how_many_full_sequences_fit():
    limits = EngineLimits(max_batch_size=3, max_seq_len=100, max_num_tokens=100)
    plan = plan_memory(
        weight_bytes=0,
        kv_bytes_per_token=8,
        limits=limits,
        kv_cache=KVCacheSection(block_size=16, memory_bytes=1500),
        available_bytes=None,
    )
    report = plan.as_report()
    assert report["kv_blocks"] == 11 and report["max_full_sequences"] == 1  # 1500 // 128 blocks, 7 per sequence


def test_the_largest_step_and_its_activations():
    assert largest_step_tokens(EngineLimits(max_batch_size=2, max_seq_len=64, max_num_tokens=512)) == 128
    assert largest_step_tokens(EngineLimits(max_batch_size=8, max_seq_len=64, max_num_tokens=256)) == 256
    cfg = config(intermediate=512)
    mlp = 100 * (2 * cfg.hidden_size + 3 * cfg.intermediate_size) * 2
    logits = 2 * 100 * cfg.vocab_size * 4
    assert step_activation_bytes(cfg, 100, 2) == max(mlp, logits)
    wide = cfg.model_copy(update={"vocab_size": 8, "intermediate_size": 4096})  # the MLP is the high point
    assert step_activation_bytes(wide, 100, 2) == 100 * (2 * cfg.hidden_size + 3 * 4096) * 2


def test_required_bytes_add_activations_and_overhead_to_weights_and_kv_cache():
    limits = EngineLimits(max_batch_size=3, max_seq_len=100, max_num_tokens=100)
    plan = plan_memory(
        weight_bytes=1000,
        kv_bytes_per_token=8,
        limits=limits,
        kv_cache=KVCacheSection(block_size=16),
        available_bytes=None,
        activation_bytes=50,
        overhead_bytes=7,
    )
    assert plan.required_bytes == 1000 + 3 * 7 * 128 + 50 + 7

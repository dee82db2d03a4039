"""KV-cache sizing, and the memory plan as an engine's report records it."""

from __future__ import annotations

from llmbuild.memory_plan import plan_memory
from llmbuild.recipe import KVCacheSection, LimitsSection


def test_default_budget_holds_max_batch_size_full_sequences_and_the_report_says_so():
    limits = LimitsSection(max_batch_size=3, max_seq_len=100, max_num_tokens=100)
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
    limits = LimitsSection(max_batch_size=3, max_seq_len=100, max_num_tokens=100)
    plan = plan_memory(
        weight_bytes=0,
        kv_bytes_per_token=8,
        limits=limits,
        kv_cache=KVCacheSection(block_size=16, memory_bytes=1500),
        available_bytes=None,
    )
    report = plan.as_report()
    assert report["kv_blocks"] == 11 and report["max_full_sequences"] == 1  # 1500 // 128 blocks, 7 per sequence

"""Scheduler decisions with fake model outputs: no engine, milliseconds per test."""

from __future__ import annotations

import pytest

from llmbuild.errors import RequestError
from llmbuild.runtime.block_pool import BlockPool
from llmbuild.runtime.request import FinishReason, Request, RequestStatus
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.scheduler import Scheduler, SchedulerConfig

EOS = 2


def make_scheduler(num_blocks=64, max_batch_size=4, max_num_tokens=32, max_seq_len=128, block_size=4):
    config = SchedulerConfig(max_batch_size, max_num_tokens, max_seq_len, block_size, frozenset({EOS}))
    return Scheduler(config, BlockPool(num_blocks))


def make_request(rid: str, prompt_len: int, max_tokens: int = 8, first_token: int = 10, **params) -> Request:
    """A prompt of consecutive ids from first_token (equal first_tokens share a cacheable prefix)."""
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, list(range(first_token, first_token + prompt_len)), sp, max_tokens=max_tokens)


def run_to_end(scheduler: Scheduler, token: int = 7, max_steps: int = 1000) -> list:
    """Drive the scheduler with a fake model that always samples `token`; return each step's batch."""
    batches = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return batches
        batch = scheduler.schedule()
        assert batch.seqs, "a step with unfinished requests scheduled nothing"
        assert batch.num_tokens <= scheduler.config.max_num_tokens
        assert len(batch.seqs) <= scheduler.config.max_batch_size
        scheduler.update(batch, [token] * len(batch.sampling_requests))
        scheduler.pool.check_integrity()
        batches.append(batch)
    raise AssertionError("requests did not finish")


def test_prefill_then_decode_until_max_tokens():
    s = make_scheduler()
    r = make_request("a", prompt_len=10, max_tokens=3)
    s.add(r)
    batches = run_to_end(s)
    assert [b.num_tokens for b in batches] == [10, 1, 1]
    assert r.output_token_ids == [7, 7, 7]
    assert r.finish_reason is FinishReason.LENGTH
    assert s.pool.num_free == s.pool.num_blocks


def test_long_prompt_is_chunked_and_decodes_go_first():
    s = make_scheduler(max_num_tokens=16)
    short = make_request("short", prompt_len=4, max_tokens=20)
    s.add(short)
    first = s.schedule()
    s.update(first, [7])
    long = make_request("long", prompt_len=40, max_tokens=2, first_token=100)
    s.add(long)
    seen_chunks = []
    while not long.output_token_ids:
        batch = s.schedule()
        # the running decode is always scheduled first, one token
        assert batch.seqs[0].request is short and batch.seqs[0].num_new_tokens == 1
        seen_chunks += [q.num_new_tokens for q in batch.seqs[1:]]
        s.update(batch, [7] * len(batch.sampling_requests))
    assert seen_chunks == [15, 15, 10]
    assert long.num_computed_tokens == 40


def test_eos_and_stop_token_ids_finish_and_min_tokens_defers_them():
    s = make_scheduler()
    eos = make_request("eos", 3)
    stop = make_request("stop", 3, stop_token_ids=(9,))
    late = make_request("late", 3, min_tokens=2)
    ignore = make_request("ignore", 3, max_tokens=2, ignore_eos=True)
    for r in (eos, stop, late, ignore):
        s.add(r)
    batch = s.schedule()
    s.update(batch, [EOS, 9, EOS, EOS])
    assert eos.finish_reason is FinishReason.STOP
    assert stop.finish_reason is FinishReason.STOP
    assert not late.is_finished and not ignore.is_finished
    batch = s.schedule()
    s.update(batch, [EOS, EOS])
    assert late.finish_reason is FinishReason.STOP and late.output_token_ids == [EOS, EOS]
    assert ignore.finish_reason is FinishReason.LENGTH
    assert s.pool.num_free == s.pool.num_blocks


def test_max_batch_size_limits_admission():
    s = make_scheduler(max_batch_size=2)
    reqs = [make_request(str(i), 3, max_tokens=2) for i in range(5)]
    for r in reqs:
        s.add(r)
    batches = run_to_end(s)
    assert max(len(b.seqs) for b in batches) == 2
    assert all(r.finish_reason is FinishReason.LENGTH for r in reqs)


def test_preemption_recomputes_and_loses_nothing():
    # 6 blocks of 4 tokens: two requests that each grow to 12 tokens cannot both stay resident
    s = make_scheduler(num_blocks=6, block_size=4, max_num_tokens=64)
    a = make_request("a", prompt_len=8, max_tokens=8)
    b = make_request("b", prompt_len=8, max_tokens=8)
    s.add(a)
    s.add(b)
    run_to_end(s)
    assert s.num_preemptions > 0
    for r in (a, b):
        assert r.output_token_ids == [7] * 8
        assert r.finish_reason is FinishReason.LENGTH
    assert s.pool.num_free == s.pool.num_blocks


def test_request_that_can_never_fit_is_refused():
    s = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(RequestError, match="KV blocks"):
        s.add(make_request("big", prompt_len=10, max_tokens=10))


def test_abort_frees_blocks_in_any_state():
    s = make_scheduler()
    running = make_request("run", 5)
    waiting = make_request("wait", 5)
    s.add(running)
    s.update(s.schedule(), [7])
    s.add(waiting)
    s.finish(running, FinishReason.ABORT)
    s.finish(waiting, FinishReason.ABORT)
    assert running.status is RequestStatus.FINISHED and waiting.status is RequestStatus.FINISHED
    assert not s.has_unfinished()
    assert s.pool.num_free == s.pool.num_blocks
    s.pool.check_integrity()


def test_max_seq_len_ends_generation():
    s = make_scheduler(max_seq_len=12)
    r = Request("r", list(range(10)), SamplingParams(max_tokens=50), max_tokens=50)
    s.add(r)
    run_to_end(s)
    assert r.num_tokens == 12 and r.finish_reason is FinishReason.LENGTH


def test_shared_prefix_is_computed_once_and_blocks_are_shared():
    s = make_scheduler(block_size=4)
    first = make_request("first", prompt_len=10, max_tokens=2)
    s.add(first)
    run_to_end(s)
    # the same 10-token prompt again: its two full blocks come from the cache, 2 tokens are computed
    again = make_request("again", prompt_len=10, max_tokens=2)
    s.add(again)
    batch = s.schedule()
    assert again.num_cached_tokens == 8 and batch.seqs[0].num_new_tokens == 2
    s.update(batch, [7])
    run_to_end(s)
    assert again.output_token_ids == first.output_token_ids
    assert s.prefix_hit_tokens == 8
    assert s.pool.num_free == s.pool.num_blocks


def test_concurrent_requests_share_blocks_by_reference():
    s = make_scheduler(block_size=4)
    a = make_request("a", prompt_len=9, max_tokens=4)
    s.add(a)
    s.update(s.schedule(), [7])
    b = make_request("b", prompt_len=9, max_tokens=4)
    s.add(b)
    s.update(s.schedule(), [7, 7])
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    s.finish(a, FinishReason.ABORT)
    s.pool.check_integrity()
    run_to_end(s)
    assert s.pool.num_free == s.pool.num_blocks


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make_scheduler(block_size=4)
    s.add(make_request("a", prompt_len=8, max_tokens=1))
    run_to_end(s)
    b = make_request("b", prompt_len=8, max_tokens=1)
    s.add(b)
    batch = s.schedule()
    # only the first block is reused: recomputing into the shared second block would write to it
    assert b.num_cached_tokens == 4 and batch.seqs[0].num_new_tokens == 4


def test_priority_orders_the_waiting_queue_and_equal_priorities_are_fcfs():
    s = make_scheduler(max_batch_size=1)
    late_low = make_request("low", 3, max_tokens=1)
    first = make_request("first", 3, max_tokens=1)
    urgent = make_request("urgent", 3, max_tokens=1)
    second = make_request("second", 3, max_tokens=1)
    late_low.priority, urgent.priority = 5, -1
    for r in (late_low, first, urgent, second):
        s.add(r)
    order = [b.seqs[0].request.request_id for b in run_to_end(s)]
    assert order == ["urgent", "first", "second", "low"]


def test_preemption_takes_the_least_important_request():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_tokens=64)
    vip = make_request("vip", prompt_len=8, max_tokens=8)
    vip.priority = -1
    other = make_request("other", prompt_len=8, max_tokens=8)
    s.add(other)
    s.add(vip)
    run_to_end(s)
    assert s.num_preemptions > 0
    assert vip.output_token_ids == [7] * 8 and other.output_token_ids == [7] * 8
    assert s.pool.num_free == s.pool.num_blocks


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_never_leaks_blocks(seed):
    import random

    rng = random.Random(seed)
    s = make_scheduler(num_blocks=24, block_size=4, max_num_tokens=24, max_batch_size=6)
    prefixes = [[rng.randrange(100) for _ in range(rng.randrange(4, 12))] for _ in range(3)]
    live = []
    for step in range(400):
        if step < 200 and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(1, 6))]
            r = Request(f"r{step}", prompt, SamplingParams(max_tokens=8), max_tokens=rng.randrange(1, 9))
            r.priority = rng.randrange(3)
            s.add(r)
            live.append(r)
        if live and rng.random() < 0.05:
            s.finish(rng.choice(live), FinishReason.ABORT)
        batch = s.schedule()
        s.update(batch, [rng.randrange(100) for _ in batch.sampling_requests])
        s.pool.check_integrity()
        for r in s.running:
            assert len(r.block_ids) * 4 >= r.num_computed_tokens
    run_to_end(s)
    assert all(r.is_finished for r in live)
    assert s.pool.num_free == s.pool.num_blocks
    assert s.prefix_hit_tokens > 0


def test_equal_blocks_after_different_prefixes_are_not_shared():
    s = make_scheduler(block_size=4)
    blocks = {}
    for rid, head in [("a", [1, 2, 3, 4]), ("b", [8, 8, 8, 8]), ("c", [8, 8, 8, 8])]:
        r = Request(rid, head + [9, 9, 9, 9, 5], SamplingParams(max_tokens=1), max_tokens=1)
        s.add(r)
        s.schedule()
        blocks[rid] = list(r.block_ids)
        run_to_end(s)
    # c repeats b: it reuses b's blocks, never a's [9, 9, 9, 9] block, which follows other tokens
    assert blocks["c"][:2] == blocks["b"][:2]
    assert blocks["c"][1] != blocks["a"][1]

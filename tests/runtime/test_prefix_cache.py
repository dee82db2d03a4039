"""Prefix caching and preemption through the real engine: same greedy tokens with and without them,
and no KV block leaked afterwards."""

from __future__ import annotations

import shutil

import pytest

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.conftest import edit_json

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_dir(make_ckpt, make_engine):
    return make_engine(
        "prefix",
        make_ckpt("llama"),
        limits={"max_batch_size": 8, "max_seq_len": 256, "max_num_tokens": 48},
        kv_cache={"block_size": 8},
    )


def shared_prefix_prompts() -> list[list[int]]:
    system = [(7 * i) % 400 + 3 for i in range(45)]  # 5 full blocks and a partial one
    return [system + [100 + i, 200 + i, 300 + i][: 1 + i % 3] for i in range(8)]


def run(llm: LLMEngine, prompts, staggered: bool) -> list[list[int]]:
    """Greedy tokens per prompt; `staggered` admits each prompt after the previous one has started."""
    if not staggered:
        return [c.token_ids for c in llm.generate(prompts, GREEDY)]
    requests = []
    for p in prompts:
        requests.append(llm.make_request(p, GREEDY))
        llm.add_request(requests[-1])
        llm.step()
    while llm.has_unfinished():
        llm.step()
    return [r.output_token_ids for r in requests]


def assert_no_leak(llm: LLMEngine) -> None:
    llm.pool.check_integrity()
    assert llm.pool.num_free == llm.pool.num_blocks
    assert not llm.scheduler.running and not llm.scheduler.waiting


def test_shared_prefixes_give_the_same_tokens_with_and_without_caching(engine_dir):
    cached, plain = LLMEngine.from_dir(engine_dir), LLMEngine.from_dir(engine_dir, enable_prefix_caching=False)
    prompts = shared_prefix_prompts()
    expected = run(plain, prompts, staggered=True)
    assert run(cached, prompts, staggered=True) == expected
    assert cached.scheduler.prefix_hit_tokens >= 7 * 40  # 7 later requests reuse the 5 full system blocks
    assert plain.scheduler.prefix_hit_tokens == 0
    # and again, now that every prompt is cached from the first round
    assert run(cached, prompts, staggered=False) == expected
    for llm in (cached, plain):
        assert_no_leak(llm)


def test_preemption_under_a_small_kv_cache_loses_nothing(engine_dir, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(engine_dir, small)
    # 40 blocks of 8 tokens: one full-length sequence fits, eight growing ones do not
    edit_json(small / "manifest.json", kv_cache__memory_bytes=40 * 8 * 512)
    tight, roomy = LLMEngine.from_dir(small, enable_prefix_caching=False), LLMEngine.from_dir(engine_dir)
    assert tight.pool.num_blocks == 40
    prompts = [[(11 * i + j) % 500 + 2 for j in range(30 + i)] for i in range(8)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = [c.token_ids for c in roomy.generate(prompts, params)]
    got = [c.token_ids for c in tight.generate(prompts, params)]
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert_no_leak(tight)


def test_abort_mid_generation_returns_every_block(engine_dir):
    llm = LLMEngine.from_dir(engine_dir)
    requests = [llm.make_request(p, GREEDY) for p in shared_prefix_prompts()]
    for r in requests:
        llm.add_request(r)
    for _ in range(5):
        llm.step()
    for r in requests[::2]:
        llm.abort(r)
    while llm.has_unfinished():
        llm.step()
    assert all(len(r.output_token_ids) == 40 for r in requests[1::2])
    assert_no_leak(llm)

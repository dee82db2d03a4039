"""Speculative decoding with a draft engine (method draft): lossless output, shadow sequences and refusals.

Target: the trained demo model in fp32. Drafts: the same checkpoint with int8 weights (agrees with it most of
the time), a random-weight model with the demo's tokenizer (agrees with it almost never: lossless must hold for
any proposer), and a model with another vocabulary (refused).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmbuild.builder.support import check_supported
from llmbuild.errors import EngineError
from llmbuild.recipe import SpeculativeSection, load_recipe
from llmbuild.runtime.draft_proposer import draft_mismatch
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.testing.checkpoints import make_checkpoint
from tests.conftest import edit_json, write_recipe
from tests.helpers import GREEDY, grounded_prompts, run_cli

DEMO = Path(__file__).parents[2] / "models" / "demo"
KV_BYTES_PER_TOKEN = 4 * 2 * 4 * 32 * 4  # demo: layers x (K, V) x kv heads x head dim x fp32
# not adaptive, min_acceptance_rate 0: sequences keep proposing, so the tests exercise verification
SPEC = SpeculativeSection(
    method="draft", num_speculative_tokens=4, max_batch_size=8, min_acceptance_rate=0.0, adaptive=False
)


@pytest.fixture(scope="module")
def int8_draft(make_engine) -> Path:
    return make_engine("demo-int8-draft", DEMO, model={"dtype": "float32"}, quantization={"weights": "int8"})


@pytest.fixture(scope="module")
def engines(demo_engine, int8_draft):
    plain = LLMEngine.from_dir(demo_engine, speculative=False)
    return plain, LLMEngine.from_dir(demo_engine, speculative=SPEC, draft_engine=int8_draft)


def _prompts(tokenizer) -> list[list[int]]:
    """The grounded prompts (5 to 49 tokens: outputs cross block edges) and a plain-text one."""
    return [*grounded_prompts(tokenizer), tokenizer.encode("Once upon a time")]


def _assert_all_freed(llm: LLMEngine) -> None:
    drafter = llm.speculator.drafter
    llm.pool.check_integrity()
    drafter.pool.check_integrity()
    assert drafter.num_shadows == 0 and drafter.pool.num_free == drafter.pool.num_blocks
    assert llm.pool.num_free == llm.pool.num_blocks


def test_greedy_tokens_equal_plain_decoding_in_a_batch_and_alone(engines):
    plain, spec = engines
    params = SamplingParams(max_tokens=40, **GREEDY)
    prompts = _prompts(plain.tokenizer)
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    assert [c.token_ids for c in spec.generate(prompts, params)] == expected
    before = spec.speculator.num_accepted_tokens
    assert [spec.generate([p], params)[0].token_ids for p in prompts] == expected
    # alone: 6 x 40 tokens, more than half of them accepted proposals (the int8 draft agrees most of the time)
    assert spec.speculator.num_accepted_tokens - before > 120
    _assert_all_freed(spec)


def test_sampled_requests_keep_most_drafted_tokens_and_a_seed_repeats(engines):
    # lossless sampling is the sampler's rejection sampling (tests/runtime/test_sampler.py, statistically);
    # here: the draft samples under the request's parameters, so the int8 draft's tokens are mostly kept
    # (one-hot greedy guesses would be kept only as often as the target samples the draft's argmax)
    _, spec = engines
    prompts = _prompts(spec.tokenizer)
    for options in (dict(temperature=0.8, seed=3), dict(temperature=1.0, top_p=0.9, seed=7)):
        params = SamplingParams(max_tokens=32, ignore_eos=True, **options)
        drafts, accepted = spec.speculator.num_draft_tokens, spec.speculator.num_accepted_tokens
        first = [c.token_ids for c in spec.generate(prompts, params)]
        rate = (spec.speculator.num_accepted_tokens - accepted) / (spec.speculator.num_draft_tokens - drafts)
        assert rate > 0.6, (options, rate)
        assert [c.token_ids for c in spec.generate(prompts, params)] == first, options
    _assert_all_freed(spec)


def test_stop_strings_stop_tokens_and_max_tokens_hold(engines):
    plain, spec = engines
    prompt = grounded_prompts(plain.tokenizer)[1]
    full = plain.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
    for params in (
        SamplingParams(max_tokens=7, **GREEDY),  # max_tokens inside a run of kept proposals
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(full.token_ids[9],)),
        SamplingParams(max_tokens=30, temperature=0.0, stop=(full.text[len(full.text) // 2 :][:3],)),
    ):
        a, b = spec.generate([prompt], params)[0], plain.generate([prompt], params)[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), params
    _assert_all_freed(spec)


def test_aborted_and_preempted_requests_free_their_shadows(engines, demo_engine, int8_draft, tmp_path):
    plain, spec = engines
    prompts = grounded_prompts(plain.tokenizer)
    params = SamplingParams(max_tokens=30, **GREEDY)
    requests = [spec.make_request(p, params) for p in prompts]
    for request in requests:
        spec.add_request(request)
    for _ in range(4):
        spec.step()
    assert spec.speculator.drafter.num_shadows == len(prompts)
    spec.abort(requests[0])
    assert spec.speculator.drafter.num_shadows == len(prompts) - 1
    while spec.has_unfinished():
        spec.step()
    _assert_all_freed(spec)
    # a target cache of 20 blocks of 16 (one max_seq_len sequence) preempts this batch of six
    shutil.copytree(demo_engine, tmp_path / "small")
    edit_json(tmp_path / "small" / "manifest.json", kv_cache__memory_bytes=20 * 16 * KV_BYTES_PER_TOKEN)
    small = LLMEngine.from_dir(tmp_path / "small", speculative=SPEC, draft_engine=int8_draft)
    batch = [p[:24] for p in prompts[2:]] * 2
    params = SamplingParams(max_tokens=48, **GREEDY)
    assert [c.token_ids for c in small.generate(batch, params)] == [c.token_ids for c in plain.generate(batch, params)]
    assert small.scheduler.num_preemptions > 0 and small.speculator.num_accepted_tokens > 0
    _assert_all_freed(small)


def test_a_short_draft_pool_proposes_less_not_an_error(engines, int8_draft, tmp_path):
    plain, _ = engines
    shutil.copytree(int8_draft, tmp_path / "draft")
    # 4 blocks of 16 tokens: room for one short sequence's shadow, not for the batch's
    edit_json(tmp_path / "draft" / "manifest.json", kv_cache__memory_bytes=4 * 16 * KV_BYTES_PER_TOKEN)
    llm = LLMEngine.from_dir(plain.engine.path, speculative=SPEC, draft_engine=tmp_path / "draft")
    assert llm.speculator.drafter.pool.num_blocks == 4
    prompts = _prompts(plain.tokenizer)
    params = SamplingParams(max_tokens=40, **GREEDY)
    assert [c.token_ids for c in llm.generate(prompts, params)] == [
        c.token_ids for c in plain.generate(prompts, params)
    ]
    _assert_all_freed(llm)
    # alone, a sequence proposes while its shadow fits the 64 tokens, then decodes without proposals
    request = llm.make_request(prompts[4], params)
    llm.add_request(request)
    while llm.has_unfinished():
        drafted, num_tokens = request.num_draft_tokens, request.num_tokens
        llm.step()
        assert num_tokens <= 64 or request.num_draft_tokens == drafted
    assert request.num_draft_tokens > 0 and request.num_tokens > 64 + 16
    assert request.output_token_ids == plain.generate([prompts[4]], params)[0].token_ids
    _assert_all_freed(llm)


def test_a_random_draft_stays_lossless_and_another_vocabulary_is_refused(
    engines, make_engine, llama_engine, tmp_path_factory
):
    plain, _ = engines
    checkpoint = make_checkpoint(
        tmp_path_factory.mktemp("ckpt-random-draft"),
        dtype="float32",
        tokenizer_from=DEMO,
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    bad = LLMEngine.from_dir(plain.engine.path, speculative=SPEC, draft_engine=make_engine("random-draft", checkpoint))
    prompts = _prompts(plain.tokenizer)
    params = SamplingParams(max_tokens=24, **GREEDY)
    ours = [c.token_ids for c in bad.generate(prompts, params)]
    assert ours == [c.token_ids for c in plain.generate(prompts, params)]
    assert bad.speculator.num_draft_tokens > 0
    with pytest.raises(EngineError, match="cannot propose for .*: its vocab_size is 512, the target's 4096"):
        LLMEngine.from_dir(plain.engine.path, speculative=SPEC, draft_engine=llama_engine)


def test_draft_mismatch_names_what_differs():
    def engine(vocab: int, tp: int = 1):
        model, target = SimpleNamespace(vocab_size=vocab), SimpleNamespace(tensor_parallel=tp)
        return SimpleNamespace(manifest=SimpleNamespace(model=model, target=target))

    same, other = SimpleNamespace(get_vocab=lambda: {"a": 0}), SimpleNamespace(get_vocab=lambda: {"b": 0})
    assert draft_mismatch(engine(8), same, engine(8), same) is None
    assert "tokenizer's vocabulary differs" in draft_mismatch(engine(8), other, engine(8), same)
    assert "vocab_size is 16, the target's 8" in draft_mismatch(engine(16), same, engine(8), same)
    assert "tensor_parallel 2" in draft_mismatch(engine(8, tp=2), same, engine(8), same)


def test_method_draft_needs_a_draft_engine_and_a_recipe_without_one_builds(engines, tmp_path):
    plain, _ = engines
    with pytest.raises(EngineError, match="method draft needs a draft engine"):
        LLMEngine.from_dir(plain.engine.path, speculative=SPEC)
    # no speculative.draft: the engine is built without one and takes --draft-engine at run time
    check_supported(load_recipe(write_recipe(tmp_path / "r.yaml", DEMO, speculative={"method": "draft"})))


def test_cli_draft_engine_speculates(capsys, demo_engine, int8_draft):
    prompt = "The dictionary is a mapping of keys to values. The dictionary is"
    common = ("run", str(demo_engine), "--prompt", prompt, "--max-tokens", "12", "--temperature", "0", "--ignore-eos")
    code, out, err = run_cli(capsys, *common, "--output", "json", "--draft-engine", str(int8_draft))
    assert code == 0, err
    on = json.loads(out)
    assert on["num_draft_tokens"] > 0 and on["num_accepted_tokens"] > 0
    code, out, err = run_cli(capsys, *common, "--output", "json", "--no-speculative")
    assert code == 0 and json.loads(out)["token_ids"] == on["token_ids"]
    code, _, err = run_cli(capsys, *common, "--no-speculative", "--draft-engine", str(int8_draft))
    assert code == 2 and "--draft-engine" in err

"""Speculative decoding (prompt lookup): proposals, the adaptive switch, and lossless output.

Lossless is checked against the engine without speculation and against transformers (greedy), token for
token for seeded sampled requests (the draws are the same ones plain decoding makes), and statistically
for the verification rule on a small vocabulary.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.request import Request
from llmbuild.runtime.sampler import Sampler
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.speculative import (
    EXPLORE_EVERY,
    MAX_EXPLORE_EVERY,
    PAUSE_TOKENS,
    WARMUP_EXPLORE_EVERY,
    WARMUP_SAMPLES,
    PromptLookup,
    Speculator,
)
from llmbuild.runtime.structured_output import Grammar
from tests.conftest import edit_json
from tests.helpers import GREEDY, PERSON, grounded_prompts

DEMO = Path(__file__).parents[2] / "models" / "demo"
KV_BYTES_PER_TOKEN = 4 * 2 * 4 * 32 * 4  # layers x (K, V) x kv heads x head dim x fp32
# not adaptive, min_acceptance_rate 0: sequences keep proposing, so the lossless tests exercise verification
SPEC = SpeculativeSection(
    num_speculative_tokens=4,
    prompt_lookup_min=1,
    prompt_lookup_max=3,
    max_batch_size=8,
    min_acceptance_rate=0.0,
    adaptive=False,
)


def _request(prompt, output=(), **params) -> Request:
    request = Request("r", list(prompt), SamplingParams(max_tokens=64, **params), max_tokens=64)
    request.output_token_ids.extend(output)
    return request


def lookup(tokens, min_n, max_n, k, prompt_len=None):
    """PromptLookup's proposal for `tokens` (the first prompt_len of them the prompt, default all)."""
    split = len(tokens) if prompt_len is None else prompt_len
    index = PromptLookup(min_n, max_n)
    index.extend(tokens[:split], tokens[split:])
    return index.propose(k)


def brute_force_lookup(tokens, min_n, max_n, k):
    """The definition, by scanning: for the longest n whose last n tokens occur earlier (ending before the last
    token), what followed the latest such occurrence."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[-n:]]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_ngram_proposes_what_followed_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], 1, 3, 4) == [8, 5, 2, 3]  # "2 3" latest: before 8
    assert lookup([1, 2, 3, 9, 7, 7, 1, 2, 3], 1, 3, 2) == [9, 7]  # the 3-gram wins over later 1-grams
    assert lookup([5, 6, 7, 5, 6], 2, 2, 8) == [7, 5, 6]  # stops at the end of the tokens
    assert lookup([1, 2, 3, 4], 1, 3, 4) == []  # the last token never occurred before
    assert lookup([4, 1, 2, 4], 2, 3, 4) == []  # a 1-gram matches, but min is 2
    assert lookup([4, 1, 4], 1, 3, 0) == []
    assert lookup([7, 7, 7], 1, 4, 4) == [7]  # the suffix itself is not an earlier occurrence
    assert lookup([1, 2, 3, 1, 2], 1, 3, 4, prompt_len=3) == [3, 1, 2]  # across the prompt / output border


def test_ngram_index_kept_up_to_date_token_by_token_proposes_what_a_scan_finds():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        tokens = torch.randint(0, 4 + trial % 5, (120,), generator=g).tolist()  # small vocabularies: many repeats
        lo, hi = 1 + trial % 2, 2 + trial % 4
        index, prompt_len = PromptLookup(lo, hi), 10 + trial
        for end in range(prompt_len, len(tokens) + 1, 1 + trial % 3):  # outputs grow by 1 .. 3 tokens per step
            index.extend(tokens[:prompt_len], tokens[prompt_len:end])
            assert index.propose(4) == brute_force_lookup(tokens[:end], lo, hi, 4), (trial, end)
        # an output cut and grown back to where it was is indexed anew, and so is one cut short (a stop string)
        regrown = tokens[:40] + [t + 1 for t in tokens[40:]]
        index.extend(regrown[:prompt_len], regrown[prompt_len:])
        assert index.propose(4) == brute_force_lookup(regrown, lo, hi, 4)
        index.extend(tokens[:prompt_len], tokens[prompt_len:40])
        assert index.propose(4) == brute_force_lookup(tokens[:40], lo, hi, 4)


def test_speculator_respects_limits_the_batch_rule_and_opt_outs():
    spec = Speculator(SPEC, max_seq_len=64)
    loop = [3, 4, 5, 3, 4, 5, 3, 4]
    assert spec.propose(_request(loop), budget=100) == (5, 3, 4)
    assert spec.propose(_request(loop), budget=3) == (5, 3)  # budget - 1
    assert spec.allows(8) and not spec.allows(9)  # above max_batch_size
    assert spec.propose(_request(loop, speculate=False), budget=100) == ()
    near_end = Speculator(SPEC, max_seq_len=10)  # 8 tokens: one proposal, then the final token fills 10
    assert near_end.propose(_request(loop), budget=100) == (5,)
    short = _request(loop)
    short.max_tokens = 2  # the final token counts too: room for one proposal
    assert spec.propose(short, budget=100) == (5,)


def test_a_request_that_rejects_its_proposals_pauses_then_tries_again():
    spec = Speculator(SpeculativeSection(min_acceptance_rate=0.3), max_seq_len=512)
    request = _request([3, 4, 5, 3, 4, 5, 3, 4])
    spec.record(request, 4, 0)
    assert request.speculation_paused_until == 0  # one miss is not enough
    spec.record(request, 4, 0)
    assert request.speculation_paused_until == PAUSE_TOKENS and request.num_draft_tokens == 8
    assert spec.propose(request, budget=100) == ()
    request.output_token_ids.extend([4] * PAUSE_TOKENS)
    assert spec.propose(request, budget=100) != ()
    spec.record(request, 4, 0)  # back from the pause, one miss pauses it again
    assert request.speculation_paused_until == 2 * PAUSE_TOKENS
    request.output_token_ids.extend([4] * PAUSE_TOKENS)
    for _ in range(3):
        spec.record(request, 4, 4)
    assert request.acceptance_rate > 0.7 and spec.num_accepted_tokens == 12
    assert request.speculation_paused_until == 2 * PAUSE_TOKENS


def _run(spec, steps, with_proposals, without, n=1):
    """`steps` steps of `n` decoding sequences, each measured as (tokens, seconds) of its kind; returns the
    decisions (True: proposals allowed)."""
    decisions = []
    for _ in range(steps):
        allowed = spec.allows(n)
        decisions.append(allowed)
        spec.observe(n, allowed, *(with_proposals if allowed else without))
    return decisions


def test_proposals_go_where_measured_steps_say_they_pay():
    spec = Speculator(SpeculativeSection(max_batch_size=8), max_seq_len=512)
    assert spec.allows(1)  # nothing measured: try a step with proposals
    spec.observe(1, True, 3, 0.060)  # 50 tok/s
    assert not spec.allows(1)  # then one without
    spec.observe(1, False, 1, 0.030)  # 33 tok/s: proposals pay
    # the slower kind is measured one step in WARMUP_EXPLORE_EVERY until it has WARMUP_SAMPLES steps, then
    # one in EXPLORE_EVERY
    decisions = _run(spec, 4 * WARMUP_EXPLORE_EVERY * WARMUP_SAMPLES + 2 * EXPLORE_EVERY, (3, 0.060), (1, 0.030))
    warmup = decisions[: WARMUP_EXPLORE_EVERY * (WARMUP_SAMPLES - 1)]
    assert warmup.count(False) == WARMUP_SAMPLES - 1
    assert decisions[-2 * EXPLORE_EVERY :].count(False) <= 2
    # the workload changed: proposals rejected, 17 tok/s; the averages follow, then the choice
    decisions = _run(spec, 400, (1, 0.060), (1, 0.030))
    assert decisions[:10] == [True] * 10 and decisions[-100:].count(True) <= 2
    assert spec.allows(2)  # another batch size is measured on its own
    assert Speculator(SPEC, max_seq_len=512).allows(1)  # not adaptive: always


def test_a_first_unlucky_measurement_does_not_decide_for_long():
    # a first verification that keeps nothing, then the usual 2 tokens per verification step at 1.6x a decode
    # step's time: proposals pay (1.25x), and the warm-up measures them enough to see it within a few dozen
    # steps (an estimate resting on the first step kept the demo model from speculating where it paid)
    spec = Speculator(SpeculativeSection(max_batch_size=8), max_seq_len=512)
    assert spec.allows(1)
    spec.observe(1, True, 1, 0.0032)
    assert not spec.allows(1)
    spec.observe(1, False, 1, 0.0020)
    decisions = _run(spec, 300, (2, 0.0032), (1, 0.0020))
    assert decisions.index(True) < WARMUP_EXPLORE_EVERY and decisions[-200:].count(False) <= 2


def test_explorations_that_confirm_the_choice_come_less_often():
    spec = Speculator(SpeculativeSection(max_batch_size=8), max_seq_len=512)
    assert spec.allows(1)
    spec.observe(1, True, 1, 0.050)  # proposals: 20 tok/s
    assert not spec.allows(1)
    spec.observe(1, False, 1, 0.010)  # without: 100 tok/s
    gaps, last = [], spec._speeds[1].steps
    for _ in range(5000):
        if spec.allows(1):  # an exploring step with proposals: still slower
            gaps.append(spec._speeds[1].steps - last)
            last = spec._speeds[1].steps
            spec.observe(1, True, 1, 0.050)
        else:
            spec.observe(1, False, 1, 0.010)
    warmup = WARMUP_SAMPLES - 1  # the first measurement came before
    assert gaps[:warmup] == [WARMUP_EXPLORE_EVERY] * warmup
    assert gaps[warmup : warmup + 6] == [EXPLORE_EVERY, 128, 256, 512, 1024, 1024]
    for _ in range(400):  # the workload changed: steps without proposals slow down past those with
        if spec.allows(1):
            break
        spec.observe(1, False, 1, 0.100)
    assert spec.allows(1) and spec._speeds[1].explore_every == EXPLORE_EVERY


def test_an_exploring_step_with_nothing_to_propose_is_no_news():
    # proposals lose; the steps that explore them find something to propose one time in three: each exploration
    # that did propose confirms the choice, the others measured a plain step and must not reset the interval
    spec = Speculator(SpeculativeSection(max_batch_size=8), max_seq_len=512)
    spec.allows(1)
    spec.observe(1, True, 1, 0.050)
    spec.allows(1)
    spec.observe(1, False, 1, 0.010)
    explorations = 0
    for _ in range(30000):
        if spec.allows(1):
            explorations += 1
            spec.observe(1, explorations % 3 == 0, 1, 0.050 if explorations % 3 == 0 else 0.010)
        else:
            spec.observe(1, False, 1, 0.010)
    assert spec._speeds[1].explore_every == MAX_EXPLORE_EVERY


class _SlowDrafter:
    """Proposes k copies of token 1, taking `seconds` to do so (a draft engine's steps)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def propose(self, requests, ks):
        time.sleep(self.seconds)
        return [(1,) * k for k in ks]

    def release(self, request):
        pass

    def probabilities(self, request):
        return None


def test_the_time_a_draft_takes_to_propose_counts_against_proposals():
    # a verification emits 3 tokens in the decode step's 10 ms: 3x faster, unless proposing took 50 ms
    for draft_seconds, proposals_win in ((0.0, True), (0.05, False)):
        spec = Speculator(SpeculativeSection(method="draft"), max_seq_len=512, drafter=_SlowDrafter(draft_seconds))
        request = _request([1, 2, 3])
        assert spec.allows(1)
        spec.propose_all([request], budget=8)
        spec.observe(1, True, 3, 0.010)
        assert not spec.allows(1)
        spec.observe(1, False, 1, 0.010)
        assert spec.allows(1) is proposals_win, draft_seconds


def test_greedy_verification_keeps_the_matching_prefix():
    sampler = Sampler(8, frozenset())
    logits = torch.full((7, 8), -5.0)
    for row, best in enumerate([2, 6, 1, 4, 0, 3, 3]):
        logits[row, best] = 5.0
    requests = [_request([1], temperature=0.0), _request([1], temperature=0.0), _request([1], temperature=0.0)]
    # rows 0-3: proposals 2 6 7 -> keeps 2 6, then 1 (not 7); rows 4-5: proposal 0 -> kept, bonus 3; row 6: none
    tokens, kept = sampler.verify(logits, requests, [(2, 6, 7), (0,), ()])
    assert (tokens, kept) == ([1, 3, 3], [2, 1, 0])


def test_verification_of_a_guess_samples_the_target_distribution():
    """The first token's distribution with a (wrong or right) one-token guess equals p: chi-square bound."""
    sampler = Sampler(6, frozenset())
    probs = torch.tensor([0.05, 0.1, 0.4, 0.25, 0.15, 0.05])
    logits = probs.log().repeat(2, 1)
    n = 20000
    for guess in (2, 5):
        request = _request([1], temperature=1.0, seed=7)
        counts = torch.zeros(6)
        for _ in range(n):
            tokens, kept = sampler.verify(logits, [request], [(guess,)])
            counts[guess if kept[0] else tokens[0]] += 1
        chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
        assert chi2 < 20.5, (guess, counts.tolist())  # 5 degrees of freedom: p = 0.001


@pytest.fixture(scope="module")
def engines(demo_engine):
    return LLMEngine.from_dir(demo_engine, speculative=False), LLMEngine.from_dir(demo_engine, speculative=SPEC)


def test_greedy_tokens_equal_plain_decoding_and_transformers(engines):
    plain, spec = engines
    params = SamplingParams(max_tokens=40, **GREEDY)
    prompts = grounded_prompts(plain.tokenizer)
    together = spec.generate(prompts, params)
    assert [c.token_ids for c in together] == [c.token_ids for c in plain.generate(prompts, params)]
    alone = [spec.generate([p], params)[0].token_ids for p in prompts]
    assert alone == [c.token_ids for c in together]
    assert spec.speculator.num_accepted_tokens > 20, "the test must exercise accepted proposals"
    hf = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    # HF's min_new_tokens bans EOS; min_tokens is our equivalent
    banned_eos = spec.generate(prompts[:2], SamplingParams(max_tokens=40, min_tokens=40, temperature=0.0))
    for prompt, ours in zip(prompts, banned_eos, strict=False):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, attention_mask=ids * 0 + 1)
        assert ours.token_ids == ref[0, len(prompt) :].tolist()
    spec.pool.check_integrity()
    assert spec.pool.num_free == spec.pool.num_blocks


def test_seeded_sampling_equals_plain_decoding_token_for_token(engines):
    plain, spec = engines
    prompts = grounded_prompts(plain.tokenizer)
    for options in (
        dict(temperature=0.8, top_k=20, seed=3),
        dict(temperature=1.0, top_p=0.9, min_p=0.02, seed=5, repetition_penalty=1.1),
        dict(temperature=0.7, seed=11, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=10),
    ):
        params = SamplingParams(max_tokens=32, ignore_eos=True, **options)
        before = spec.speculator.num_draft_tokens
        ours = [c.token_ids for c in spec.generate(prompts, params)]
        assert ours == [c.token_ids for c in plain.generate(prompts, params)], options
        assert spec.speculator.num_draft_tokens > before


def test_stops_limits_and_logprobs_hold(engines):
    plain, spec = engines
    prompt = grounded_prompts(plain.tokenizer)[1]
    full = plain.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
    stop_token = full.token_ids[9]
    for params in (
        SamplingParams(max_tokens=7, **GREEDY),  # max_tokens inside a run of kept proposals
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(stop_token,)),
        SamplingParams(max_tokens=30, temperature=0.0, stop=(full.text[len(full.text) // 2 :][:3],)),
    ):
        a, b = spec.generate([prompt], params)[0], plain.generate([prompt], params)[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), params
    params = SamplingParams(max_tokens=24, logprobs=2, **GREEDY)
    a = [o.logprobs for o in spec.stream(spec.make_request(prompt, params))]
    b = [o.logprobs for o in plain.stream(plain.make_request(prompt, params))]
    assert len(a) == len(b) == 24
    for x, y in zip(a, b, strict=True):
        assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_constrained_requests_speculate_and_keep_their_grammar(engines):
    """Proposals under a grammar: each row masked by the grammar's state after the proposals before it."""
    plain, spec = engines
    prompts = ["A Python container described as JSON: ", "The list type as JSON: "]
    before = spec.speculator.num_accepted_tokens
    for options in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.95, seed=4)):
        params = SamplingParams(max_tokens=160, structured=Grammar.json_schema(PERSON), **options)
        ours = spec.generate(prompts, params)
        assert [c.text for c in ours] == [c.text for c in plain.generate(prompts, params)], options
        for done in ours:
            assert done.finish_reason == "stop" and set(json.loads(done.text)) >= set(PERSON["required"])
    assert spec.speculator.num_accepted_tokens > before  # proposals were checked and kept under the grammar


def test_preemption_and_prefix_cache_keep_the_tokens(engines, demo_engine, tmp_path):
    """A KV cache too small for the batch preempts speculating sequences; shared prefixes come from the cache."""
    plain, _ = engines
    prompts = [p[:24] for p in grounded_prompts(plain.tokenizer)[2:]] * 2
    params = SamplingParams(max_tokens=48, **GREEDY)
    shutil.copytree(demo_engine, tmp_path / "small")
    # 20 blocks of 16: one max_seq_len sequence fits, six of up to 72 tokens (30 blocks) do not at once
    edit_json(tmp_path / "small" / "manifest.json", kv_cache__memory_bytes=20 * 16 * KV_BYTES_PER_TOKEN)
    small = LLMEngine.from_dir(tmp_path / "small", speculative=SPEC)
    assert small.pool.num_blocks == 20
    ours = [c.token_ids for c in small.generate(prompts, params)]
    assert ours == [c.token_ids for c in plain.generate(prompts, params)]
    assert small.scheduler.num_preemptions > 0 and small.scheduler.prefix_hit_tokens > 0
    assert small.speculator.num_accepted_tokens > 0
    small.pool.check_integrity()
    assert small.pool.num_free == small.pool.num_blocks


def test_an_engine_built_with_a_speculative_section_speculates_by_default(make_ckpt, make_engine, llama_engine):
    section = {"num_speculative_tokens": 2, "prompt_lookup_max": 2, "max_batch_size": 2}
    engine = make_engine("llama-spec", make_ckpt("llama"), speculative=section)
    llm = LLMEngine.from_dir(engine)
    assert llm.speculator is not None and llm.speculator.config == SpeculativeSection(**section)
    assert LLMEngine.from_dir(engine, speculative=False).speculator is None
    assert LLMEngine.from_dir(llama_engine).speculator is None
    # runtime settings only: the same graph as the engine without them (one build-cache entry)
    assert (engine / "rank0" / "exported.pt2").read_bytes() == (llama_engine / "rank0" / "exported.pt2").read_bytes()

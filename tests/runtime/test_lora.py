"""Multi-LoRA serving: adapters written by peft, run from an engine's slots, against transformers with each
adapter merged into the base weights (W + scale * B @ A) — the oracle — in one concurrent batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmbuild.errors import LoraError, RequestError
from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.block_pool import BlockPool
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.request import FinishReason, Request
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.scheduler import Scheduler, SchedulerConfig
from tests.helpers import (
    ALL_LORA_MODULES,
    GREEDY,
    greedy_tokens,
    make_peft_adapter,
    random_prompt,
    teacher_forced_logits,
)

ADAPTERS = {
    "everything-r8": dict(r=8, lora_alpha=32, target_modules=ALL_LORA_MODULES),
    "qv-r4": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp-rslora-r16": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
LORA = {"max_loras": 2, "max_rank": 16}  # fewer slots than adapters: they take turns
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(make_ckpt, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (PEFT directory, transformers model with the adapter merged)."""
    ckpt, root = make_ckpt("llama"), tmp_path_factory.mktemp("adapters")
    return {
        name: (root / name, make_peft_adapter(ckpt, root / name, seed, **config))
        for seed, (name, config) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def base_model(make_ckpt) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(make_ckpt("llama"), dtype=torch.float32).eval()


def lora_engine(make_ckpt, make_engine, backend: str) -> Path:
    return make_engine(f"llama-lora-{backend}", make_ckpt("llama"), lora=LORA, target={"backend": backend})


def serving(engine: Path, adapters: dict[str, tuple[Path, torch.nn.Module]]) -> LLMEngine:
    llm = LLMEngine.from_dir(engine)
    assert llm.loras is not None
    for name, (path, _) in adapters.items():
        llm.loras.register(name, path)
    return llm


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_every_adapter_and_the_base_match_transformers_merged_in_one_batch(
    backend, make_ckpt, make_engine, adapters, base_model
):
    prompts = [random_prompt(9 + 5 * i, seed=40 + i) for i in range(2)]
    cases = [(name, p) for name in (None, *adapters) for p in prompts]  # 8 requests, 3 adapters, 2 slots
    with serving(lora_engine(make_ckpt, make_engine, backend), adapters) as llm:
        requests = [
            llm.make_request(p, SamplingParams(max_tokens=NEW_TOKENS, **GREEDY), lora=name) for name, p in cases
        ]
        for r in requests:
            llm.add_request(r)
        while llm.has_unfinished():
            llm.step()
            assert llm.loras is not None and llm.loras.slots_in_use() <= LORA["max_loras"]
        assert llm.loras is not None and llm.loras.num_loads >= len(adapters)  # 3 through 2 slots
    for (name, prompt), request in zip(cases, requests, strict=True):
        oracle = base_model if name is None else adapters[name][1]
        assert request.output_token_ids == greedy_tokens(oracle, prompt, NEW_TOKENS), f"adapter {name}"
    outputs = {
        name: [r.output_token_ids for (n, _), r in zip(cases, requests, strict=True) if n == name] for name, _ in cases
    }
    assert all(outputs[name] != outputs[None] for name in adapters), "an adapter changed nothing: a weak test"


def test_tensor_parallel_ranks_each_run_their_shard_of_every_adapter(make_ckpt, make_engine, adapters, base_model):
    engine = make_engine("llama-lora-tp2", make_ckpt("llama"), lora=LORA, target={"tensor_parallel": 2})
    prompts = [random_prompt(11, seed=60), random_prompt(15, seed=61)]
    cases = [(name, p) for name in (None, *adapters) for p in prompts]
    with serving(engine, adapters) as llm:
        requests = [llm.make_request(p, SamplingParams(max_tokens=NEW_TOKENS, **GREEDY), lora=n) for n, p in cases]
        for r in requests:
            llm.add_request(r)
        while llm.has_unfinished():
            llm.step()
    for (name, prompt), request in zip(cases, requests, strict=True):
        oracle = base_model if name is None else adapters[name][1]
        assert request.output_token_ids == greedy_tokens(oracle, prompt, NEW_TOKENS), f"adapter {name}"


def test_speculative_decoding_verifies_each_proposal_with_its_requests_adapter(make_engine, tmp_path):
    # the trained demo model continues its prompt, so prompt-lookup proposals get accepted; a proposal computed
    # in the same step as its request's last token must run with the request's adapter too (slot per token)
    demo = Path(__file__).parents[2] / "models" / "demo"
    merged = make_peft_adapter(demo, tmp_path / "demo-ad", 7, r=8, lora_alpha=8, target_modules=ALL_LORA_MODULES)
    engine = make_engine("demo-lora", demo, model={"dtype": "float32"}, lora={"max_loras": 1, "max_rank": 8})
    spec = SpeculativeSection(num_speculative_tokens=3, max_batch_size=8, min_acceptance_rate=0.0, adaptive=False)
    passages = (demo / "validation.txt").read_text().split("\n\n")
    with LLMEngine.from_dir(engine, speculative=spec) as llm:
        assert llm.loras is not None
        llm.loras.register("ad", tmp_path / "demo-ad")
        prompts = []
        for n, passage in zip((14, 16, 24, 33), passages, strict=False):
            ids = llm.tokenizer.encode(passage)[:n]
            prompts.append(ids + llm.tokenizer.encode("\n\n") + ids[: n // 2])  # its continuation is in it
        params = SamplingParams(max_tokens=40, **GREEDY)
        requests = [llm.make_request(p, params, lora="ad") for p in prompts]
        for r in requests:
            llm.add_request(r)
        while llm.has_unfinished():
            llm.step()
    assert sum(r.num_accepted_tokens for r in requests) >= 4, "the test must exercise accepted proposals"
    for prompt, request in zip(prompts, requests, strict=True):
        assert request.output_token_ids == greedy_tokens(merged, prompt, 40)


def test_requests_without_an_adapter_compute_exactly_what_an_engine_without_slots_does(
    make_ckpt, make_engine, llama_engine, adapters
):
    prompt, forced = random_prompt(20, 1), random_prompt(12, 2)
    with LLMEngine.from_dir(llama_engine) as plain:
        want = teacher_forced_logits(plain, prompt, forced)
    with serving(lora_engine(make_ckpt, make_engine, "eager"), adapters) as llm:
        got = teacher_forced_logits(llm, prompt, forced)
    assert torch.equal(got, want)


def test_the_prefix_cache_never_hands_one_adapters_kv_blocks_to_another(make_ckpt, make_engine, adapters, base_model):
    prompt = random_prompt(40, 7)  # two full blocks of 16 to reuse
    with serving(lora_engine(make_ckpt, make_engine, "eager"), adapters) as llm:
        runs = []
        for name in ("everything-r8", None, "everything-r8", "qv-r4"):
            params = SamplingParams(max_tokens=NEW_TOKENS, **GREEDY)
            runs.append(llm.generate([prompt], params, lora=name)[0].token_ids)
        hits = llm.scheduler.prefix_hit_tokens
    assert hits == 32, "the second run of the same adapter reuses its own blocks, no other run does"
    for name, tokens in zip(("everything-r8", None, "everything-r8", "qv-r4"), runs, strict=True):
        oracle = base_model if name is None else adapters[name][1]
        assert tokens == greedy_tokens(oracle, prompt, NEW_TOKENS), f"adapter {name}"


def test_a_bad_adapter_is_refused_in_one_line_and_the_engine_keeps_serving(
    make_ckpt, make_engine, adapters, base_model, tmp_path
):
    too_big = make_peft_adapter(make_ckpt("llama"), tmp_path / "r32", 5, r=32, lora_alpha=32, target_modules=["q_proj"])
    del too_big
    prompt = random_prompt(12, 3)
    with serving(lora_engine(make_ckpt, make_engine, "eager"), adapters) as llm:
        assert llm.loras is not None
        with pytest.raises(LoraError, match="rank 32") as err:
            llm.loras.register("r32", tmp_path / "r32")
        assert "\n" not in str(err.value)
        with pytest.raises(LoraError, match="already loaded"):
            llm.loras.register("qv-r4", adapters["qv-r4"][0])
        with pytest.raises(RequestError, match="no LoRA adapter named 'r32'"):
            llm.make_request(prompt, SamplingParams(max_tokens=2), lora="r32")
        params = SamplingParams(max_tokens=NEW_TOKENS, **GREEDY)
        assert llm.generate([prompt], params, lora="qv-r4")[0].token_ids == greedy_tokens(
            adapters["qv-r4"][1], prompt, NEW_TOKENS
        )


def test_an_unloaded_adapter_finishes_its_running_requests_and_takes_no_new_ones(make_ckpt, make_engine, adapters):
    prompt = random_prompt(12, 4)
    with serving(lora_engine(make_ckpt, make_engine, "eager"), adapters) as llm:
        assert llm.loras is not None
        request = llm.make_request(prompt, SamplingParams(max_tokens=NEW_TOKENS, **GREEDY), lora="qv-r4")
        llm.add_request(request)
        llm.step()
        llm.loras.unregister("qv-r4")
        while llm.has_unfinished():
            llm.step()
        assert request.output_token_ids == greedy_tokens(adapters["qv-r4"][1], prompt, NEW_TOKENS)
        with pytest.raises(RequestError, match="no LoRA adapter named 'qv-r4'"):
            llm.make_request(prompt, SamplingParams(max_tokens=2), lora="qv-r4")


def test_an_engine_without_slots_refuses_an_adapter(llama_engine):
    with LLMEngine.from_dir(llama_engine) as llm:
        with pytest.raises(RequestError, match="no LoRA slots"):
            llm.make_request([5, 6, 7], SamplingParams(max_tokens=2), lora="anything")


# --- the scheduler's share of it: at most max_loras adapters in the running batch, none waits forever ---


def _request(lora_id: int | None, tokens: int = 4) -> Request:
    return Request(
        request_id=f"r{lora_id}-{random_prompt(1, tokens)[0]}",
        prompt_token_ids=[1] * tokens,
        params=SamplingParams(max_tokens=4),
        max_tokens=4,
        lora=None if lora_id is None else SimpleNamespace(lora_id=lora_id),
    )


def test_the_scheduler_admits_no_more_adapters_than_slots_and_keeps_arrival_order_among_them():
    config = SchedulerConfig(
        max_batch_size=8, max_num_tokens=64, max_seq_len=64, block_size=4, eos_token_ids=frozenset(), max_loras=2
    )
    scheduler = Scheduler(config, BlockPool(64))
    first, second, third, again_first, base = _request(1), _request(2), _request(3), _request(1), _request(None)
    for r in (first, second, third, again_first, base):
        scheduler.add(r)
    batch = scheduler.schedule()
    admitted = [s.request for s in batch.seqs]
    # the third adapter waits for a slot, and the later request for adapter 1 may not take the slot first;
    # a request without an adapter needs no slot
    assert admitted == [first, second, base]
    scheduler.finish(first, FinishReason.ABORT)
    batch = scheduler.schedule()
    assert third in [s.request for s in batch.seqs]
    assert again_first not in scheduler.running

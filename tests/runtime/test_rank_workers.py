"""Tensor-parallel engines end to end: built with target.tensor_parallel, run by rank 0 with its
other ranks in worker processes (runtime/rank_workers.py), on CPU with gloo.

The oracle is the same recipe built with one rank: fp32 logits within 1e-4 (prefill, then decode
steps after it) and identical greedy tokens, for Llama and Qwen2 (q/k/v bias), with kv heads split
(tp 2) and replicated (tp 4 > 2 kv heads), eager and compiled.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llmbuild.errors import EngineError
from llmbuild.manifest import Manifest
from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.builder.quantization_fixtures import DEMO
from tests.conftest import ARCHS
from tests.helpers import GREEDY, random_prompt, teacher_forced_logits, worker_pids

CASES = [
    pytest.param(("llama", 2, "eager"), id="llama-tp2-eager"),
    pytest.param(("qwen2", 2, "eager"), id="qwen2-tp2-eager"),
    pytest.param(("qwen2", 4, "eager"), id="qwen2-tp4-eager-replicated-kv"),
    pytest.param(("llama", 2, "compiled"), id="llama-tp2-compiled", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CASES)
def tp_case(request, make_ckpt, make_engine):
    """(tp, the one-rank engine, the tensor-parallel engine) of one recipe."""
    arch, tp, backend = request.param
    ckpt = make_ckpt(arch, **ARCHS[arch])
    one = make_engine(f"{arch}-{backend}-fp32", ckpt, target={"backend": backend})
    many = make_engine(f"{arch}-{backend}-tp{tp}", ckpt, target={"backend": backend, "tensor_parallel": tp})
    return tp, one, many


@pytest.fixture(scope="module")
def tp2_engine(make_ckpt, make_engine) -> Path:
    return make_engine("llama-eager-tp2", make_ckpt("llama"), target={"backend": "eager", "tensor_parallel": 2})


def test_tensor_parallel_engine_matches_one_rank(tp_case):
    tp, one, many = tp_case
    prompt, forced = random_prompt(40, seed=1), random_prompt(24, seed=2)
    prompts = [random_prompt(n, seed=n) for n in (5, 33, 17)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    with LLMEngine.from_dir(one) as llm:
        expected = teacher_forced_logits(llm, prompt, forced)
        expected_tokens = [c.token_ids for c in llm.generate(prompts, params)]
    threads = torch.get_num_threads()
    with LLMEngine.from_dir(many) as llm:
        assert len(worker_pids()) == tp - 1
        assert torch.get_num_threads() == max(1, threads // tp)  # the ranks share the cores
        logits = teacher_forced_logits(llm, prompt, forced)
        tokens = [c.token_ids for c in llm.generate(prompts, params)]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert tokens == expected_tokens
    assert worker_pids() == [] and not dist.is_initialized() and torch.get_num_threads() == threads


def test_each_rank_has_its_own_weights_and_the_same_code(tp2_engine):
    manifest = Manifest.load(tp2_engine)
    assert manifest.target.tensor_parallel == 2
    assert {"rank0/weights.safetensors", "rank1/weights.safetensors", "rank1/exported.pt2"} <= set(manifest.files)
    assert manifest.files["rank0/exported.pt2"] == manifest.files["rank1/exported.pt2"]
    assert manifest.files["rank0/weights.safetensors"] != manifest.files["rank1/weights.safetensors"]
    with pytest.raises(EngineError, match="engine has ranks 0..1, not rank 2"):
        Engine.load(tp2_engine, rank=2)
    with pytest.raises(EngineError, match="runs all its ranks; use LLMEngine.from_dir"):
        LLMEngine(Engine.load(tp2_engine, rank=0))


def test_a_rank_that_fails_to_load_is_named_and_nothing_is_left_running(tp2_engine, tmp_path):
    import shutil

    broken = tmp_path / "engine"
    shutil.copytree(tp2_engine, broken)
    with (broken / "rank1" / "weights.safetensors").open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    with pytest.raises(EngineError, match=r"tensor-parallel rank 1: .*rank1/weights.safetensors"):
        LLMEngine.from_dir(broken)
    assert worker_pids() == [] and not dist.is_initialized()


def test_a_worker_that_dies_is_reported_by_the_next_step_and_when_idle(tp2_engine):
    params = SamplingParams(max_tokens=4, **GREEDY)
    with LLMEngine.from_dir(tp2_engine) as llm:
        assert len(llm.generate([[5, 6, 7]], params)[0].token_ids) == 4
        (pid,) = worker_pids()
        os.kill(pid, signal.SIGKILL)
        llm.workers.procs[0].wait()  # type: ignore[union-attr]  # a tensor-parallel engine has workers
        with pytest.raises(EngineError, match=rf"worker rank 1 \(pid {pid}\) exited with code -9"):
            llm.keep_alive()
        with pytest.raises(EngineError, match=rf"worker rank 1 \(pid {pid}\)"):
            llm.generate([[5, 6, 7]], params)
    assert not dist.is_initialized()


def test_one_tensor_parallel_engine_per_process(tp2_engine):
    with LLMEngine.from_dir(tp2_engine):
        with pytest.raises(EngineError, match="already running in this process"):
            LLMEngine.from_dir(tp2_engine)


QUANTIZED = {
    "int8": {"weights": "int8"},
    # 704 / 2 = 352 MLP columns per rank fit no int4 group of 64: down stays bf16
    "int4": {"weights": "int4", "group_size": 64, "exclude": ["*.mlp.down"]},
    # each rank keeps its kv heads' scales (2 of the demo's 4)
    "kv-int8": {"kv_cache": "int8", "calibration": {"num_samples": 16, "seq_len": 256}},
}


@pytest.mark.parametrize("weights", sorted(QUANTIZED))
def test_quantized_bf16_engines_shard_too(make_engine, weights):
    # bf16 partial sums are rounded before the all-reduce adds them: near, not equal, to one rank
    sections = {"model": {"dtype": "bfloat16"}, "quantization": QUANTIZED[weights]}
    one = make_engine(f"demo-{weights}-tp1-shardable", DEMO, **sections)
    many = make_engine(f"demo-{weights}-tp2", DEMO, target={"tensor_parallel": 2}, **sections)
    prompt, forced = random_prompt(48, seed=3, vocab=4096), random_prompt(16, seed=4, vocab=4096)
    with LLMEngine.from_dir(one) as llm:
        expected = teacher_forced_logits(llm, prompt, forced)
    with LLMEngine.from_dir(many) as llm:
        logits = teacher_forced_logits(llm, prompt, forced)
    agreement = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    error = (logits - expected).abs().mean().item() / expected.std().item()
    assert agreement >= 0.95 and error < 0.02, (agreement, error)


def test_speculative_decoding_runs_on_every_rank(make_engine):
    """Verification steps (several tokens and logit rows per sequence) on a tensor-parallel engine: the tokens
    of plain decoding, with proposals accepted."""
    engine = make_engine("demo-eager-tp2", DEMO, model={"dtype": "float32"}, target={"tensor_parallel": 2})
    prompts = ["A function is", "The dictionary is a mapping of keys to values. The dictionary is", "The list"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with LLMEngine.from_dir(engine, speculative=False) as llm:
        expected = [c.token_ids for c in llm.generate(prompts, params)]
    spec = SpeculativeSection(num_speculative_tokens=3, max_batch_size=4)
    with LLMEngine.from_dir(engine, speculative=spec) as llm:
        assert [c.token_ids for c in llm.generate(prompts, params)] == expected
        assert llm.speculator is not None and llm.speculator.num_draft_tokens > 0

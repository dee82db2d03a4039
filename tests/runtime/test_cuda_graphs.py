"""Decode-step bucketing and padding for CUDA graphs (runtime/cuda_graphs.py), checked on CPU with
real engine graphs: a padded step must give the real rows' logits and cache writes unchanged."""

from __future__ import annotations

import pytest
import torch

from llmbuild.runtime.cuda_graphs import DecodeGraphs, bucket_for, is_decode_step, pad_decode_step
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.runtime.step_inputs import StepInputs
from tests.helpers import generate

BUCKETS = (1, 2, 4, 8)


@pytest.mark.parametrize("num_seqs,bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, None), (64, None)])
def test_the_smallest_bucket_that_holds_the_batch_else_none(num_seqs, bucket):
    assert bucket_for(BUCKETS, num_seqs) == bucket


def decode_inputs(llm: LLMEngine, prompts: list[list[int]]) -> StepInputs:
    """The graph inputs of the first step in which every prompt decodes."""
    for prompt in prompts:
        llm.add_request(llm.make_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    llm.step()  # the prompts, in one packed prefill
    batch = llm.scheduler.schedule()
    inputs, _ = llm.runner.prepare(batch)
    assert is_decode_step(inputs)
    return inputs


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_a_padded_decode_step_changes_nothing_real(make_ckpt, make_engine, backend):
    # the same engines as the parity and compiled-build tests use
    name = "llama-compiled" if backend == "compiled" else "llama-eager-fp32"
    engine = make_engine(name, make_ckpt("llama"), target={"backend": backend})
    llm = LLMEngine.from_dir(engine)
    inputs = decode_inputs(llm, [[5, 6, 7, 8, 9], list(range(10, 40)), [3, 4]])
    # one block beyond the pool's is the scratch block; both runs start from the same cache
    scratch = llm.memory.num_blocks
    caches = [torch.cat([c, torch.zeros_like(c[:1])]) for c in llm.runner.kv_caches]
    plain_caches, padded_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    block_size = llm.engine.manifest.kv_cache.block_size
    padded = pad_decode_step(inputs, 8, scratch, block_size)
    with torch.inference_mode():
        plain = llm.engine.graph(inputs.as_tuple(), plain_caches)
        out = llm.engine.graph(padded.as_tuple(), padded_caches)
    assert out.shape[0] == 8
    torch.testing.assert_close(out[:3], plain, atol=1e-4, rtol=0)  # other GEMM blockings at M=8
    for before, plain_cache, padded_cache in zip(caches, plain_caches, padded_caches, strict=True):
        # real blocks: the same slots written, with the same values (up to the GEMM blocking)
        written = (plain_cache != before).any(-1)
        assert torch.equal((padded_cache[:scratch] != before[:scratch]).any(-1), written[:scratch])
        torch.testing.assert_close(padded_cache[:scratch], plain_cache[:scratch], atol=1e-4, rtol=0)
        assert torch.equal(plain_cache[scratch], before[scratch])
        assert not torch.equal(padded_cache[scratch], before[scratch])  # the dummies wrote only there


def test_only_decode_steps_pad(llama_engine):
    llm = LLMEngine.from_dir(llama_engine)
    llm.add_request(llm.make_request([5, 6, 7], SamplingParams(max_tokens=4)))
    prefill, _ = llm.runner.prepare(llm.scheduler.schedule())
    assert not is_decode_step(prefill)
    with pytest.raises(ValueError, match="cannot pad a step of 3 tokens / 1 sequences"):
        pad_decode_step(prefill, 4, 0, 16)
    llm.step()
    decode = decode_inputs(llm, [[9, 10]])
    with pytest.raises(ValueError, match="to a decode bucket 1"):
        pad_decode_step(decode, 1, 0, 16)


class RerunCapture:
    """The CPU stand-in for a CUDA graph capture: a replay re-runs the step on the captured buffers
    and writes the captured logits tensor, which is what a graph replay does on a GPU."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.replays = 0

    def __call__(self, step, static, pool):
        logits = step(static)
        self.captured.append(static.input_ids.shape[0])

        def replay() -> None:
            self.replays += 1
            logits.copy_(step(static))

        return replay, logits, pool


def test_decode_graphs_generate_what_plain_steps_generate(make_ckpt, make_engine):
    engine = make_engine("llama-compiled", make_ckpt("llama"), target={"backend": "compiled"})
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3, 4], [11, 12, 13]]
    # sequences finish at different steps, so decode batches of 4, 3, 2 and 1 sequences all occur
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 9, 6, 12)]

    expected = generate(LLMEngine.from_dir(engine), prompts, params)
    llm = LLMEngine.from_dir(engine)
    scratch = llm.memory.num_blocks
    llm.runner.kv_caches = [torch.cat([c, torch.zeros_like(c[:1])]) for c in llm.runner.kv_caches]
    capture = RerunCapture()
    llm.runner.capture_decode_graphs((1, 2, 3), scratch, capture=capture)
    assert capture.captured == [3, 2, 1]  # largest first
    assert generate(llm, prompts, params) == expected
    # decode steps 1-2 have 4 sequences, more than the largest bucket: no graph; then 3 steps each of 3, 2, 1
    assert capture.replays == 3 + 3 + 3


def test_a_step_with_prompt_tokens_or_too_many_sequences_is_not_replayed(llama_engine):
    llm = LLMEngine.from_dir(llama_engine)
    capture = RerunCapture()
    step = lambda inputs: torch.zeros(inputs.input_ids.shape[0], 4)  # noqa: E731
    graphs = DecodeGraphs(step, (1, 2), 4, 0, 16, torch.device("cpu"), capture)
    llm.add_request(llm.make_request([5, 6, 7], SamplingParams(max_tokens=4)))
    prefill, _ = llm.runner.prepare(llm.scheduler.schedule())
    assert graphs.replay(prefill) is None
    llm.step()
    decode = decode_inputs(llm, [[9, 10], [11, 12]])  # 3 sequences
    assert graphs.replay(decode) is None
    assert capture.replays == 0

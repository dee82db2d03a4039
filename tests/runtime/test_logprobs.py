"""Prompt and token logprobs: against Hugging Face transformers (the oracle) and by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.logprobs import token_logprobs
from llmbuild.runtime.sampling_params import SamplingParams
from tests.helpers import GREEDY, random_prompt


def test_token_logprobs_by_hand():
    # probabilities 0.5, 0.25, 0.125, 0.125: exact in binary
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.25, 0.125]]))
    (lp,) = token_logprobs(logits, [2], k=2)
    assert lp.token_id == 2 and lp.rank == 2
    assert lp.logprob == pytest.approx(math.log(0.25), abs=1e-6)
    assert [i for i, _ in lp.top] == [1, 2]
    assert lp.top[0][1] == pytest.approx(math.log(0.5), abs=1e-6)
    (none,) = token_logprobs(logits, [0], k=0)
    assert none.top == [] and none.rank == 3  # ties count as equal, not above


@pytest.fixture(scope="module")
def llama(make_ckpt, llama_engine):
    ckpt = make_ckpt("llama")
    return LLMEngine.from_dir(llama_engine), AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log p(prompt[i] | prompt[:i]) for i >= 1."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


def run(llm: LLMEngine, prompt: list[int], **params):
    request = llm.make_request(prompt, SamplingParams(max_tokens=2, **GREEDY, **params))
    outputs = list(llm.stream(request))
    return request, outputs


@pytest.mark.parametrize("chunk", [256, 7], ids=["one-step", "chunked"])
def test_prompt_logprobs_match_hf(llama, chunk):
    llm, hf = llama
    llm.scheduler.config = dataclasses.replace(llm.scheduler.config, max_num_tokens=chunk)
    try:
        prompt = random_prompt(40, 5)
        request, outputs = run(llm, prompt, prompt_logprobs=3)
    finally:
        llm.scheduler.config = dataclasses.replace(llm.scheduler.config, max_num_tokens=256)
    scored = outputs[0].prompt_logprobs
    assert scored is request.prompt_logprobs and outputs[1].prompt_logprobs is None  # once, on the first output
    assert len(scored) == len(prompt) and scored[0] is None
    ours = torch.tensor([lp.logprob for lp in scored[1:]])
    torch.testing.assert_close(ours, hf_prompt_logprobs(hf, prompt), atol=1e-4, rtol=0)
    assert [lp.token_id for lp in scored[1:]] == prompt[1:]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, 9]
    assert [i for i, _ in scored[10].top] == torch.topk(logits, 3).indices.tolist()
    assert scored[10].rank == int((logits > logits[prompt[10]]).sum()) + 1
    assert llm.pool.num_free == llm.pool.num_blocks


def test_prompt_logprobs_ignore_the_prefix_cache(llama):
    llm, _ = llama
    prompt = random_prompt(100, 6)  # several full blocks: a second run would find them cached
    first, _ = run(llm, prompt, prompt_logprobs=0)
    second, _ = run(llm, prompt, prompt_logprobs=0)
    assert second.num_cached_tokens == 0
    assert [lp and lp.logprob for lp in second.prompt_logprobs] == [lp and lp.logprob for lp in first.prompt_logprobs]
    plain, _ = run(llm, prompt)
    assert plain.num_cached_tokens > 0 and plain.prompt_logprobs == []  # the cache still serves the rest


def test_logit_bias_forces_and_bans_tokens(llama):
    llm, _ = llama
    prompt = random_prompt(12, 7)
    _, free = run(llm, prompt)
    top = free[0].token_id
    _, banned = run(llm, prompt, logit_bias=((top, -100.0),))
    assert banned[0].token_id != top
    _, forced = run(llm, prompt, logit_bias=((5, 100.0),))
    assert [o.token_id for o in forced] == [5, 5]


def test_logit_bias_token_out_of_the_vocabulary_is_refused(llama):
    llm, _ = llama
    vocab = llm.engine.manifest.model.vocab_size
    with pytest.raises(Exception, match=f"logit_bias token id {vocab} is out of range"):
        llm.make_request([1, 2], SamplingParams(logit_bias=((vocab, 1.0),)))

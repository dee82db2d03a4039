"""Prompt scoring and logit_bias over the wire: echo with logprobs (OpenAI's shape, what
lm-eval-harness's loglikelihood tasks send), vLLM's prompt_logprobs, max_tokens 0; checked against
Hugging Face transformers on the served checkpoint."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serve.conftest import API_KEY

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(make_ckpt):
    ckpt = make_ckpt("llama")
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(ckpt)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def test_echo_with_max_tokens_0_scores_the_prompt(client, hf):
    model, tok = hf
    ids = tok.encode(PROMPT)
    r = client.completions.create(model="serve", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = hf_logprobs(model, ids)
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=0)
    for i, top in enumerate(lp.top_logprobs[1:]):
        # the 2 most likely tokens, and the prompt's own token (OpenAI: up to logprobs + 1)
        wanted = {tok.decode([t]) for t in torch.topk(ref[i], 2).indices.tolist()} | {tok.decode([ids[i + 1]])}
        assert set(top) == wanted
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_of_token_ids_with_generation_as_lm_eval_sends_it(client, hf):
    model, tok = hf
    context, continuation = tok.encode("The quick brown"), tok.encode(" fox jumps", add_special_tokens=False)
    ids = context + continuation
    # lm-eval's local-completions loglikelihood request
    r = client.completions.create(model="serve", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and r.usage.completion_tokens == 1
    assert r.choices[0].text.startswith(tok.decode(ids))
    ref = hf_logprobs(model, ids)
    expected = ref[len(context) - 1 :].gather(1, torch.tensor(continuation)[:, None]).sum().item()
    assert sum(lp.token_logprobs[len(context) : -1]) == pytest.approx(expected, abs=1e-4)
    # the generated token's entry follows the prompt's, its text after the echoed text
    assert lp.text_offset[-1] == len(tok.decode(ids))


def test_streamed_echo_gives_the_same_text_and_logprobs(client):
    whole = client.completions.create(model="serve", prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, temperature=0)
    chunks = list(
        client.completions.create(
            model="serve", prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs


def test_prompt_logprobs_in_vllm_shape(server, hf):
    model, tok = hf
    ids = tok.encode(PROMPT)
    with server.client() as c:
        body = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1}).json()
    scored = body["choices"][0]["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    ref = hf_logprobs(model, ids)
    for i, entry in enumerate(scored[1:]):
        own = entry[str(ids[i + 1])]
        assert own["logprob"] == pytest.approx(ref[i, ids[i + 1]].item(), abs=1e-4)
        assert own["rank"] == int((ref[i] > ref[i, ids[i + 1]]).sum()) + 1
        assert own["decoded_token"] == tok.decode([ids[i + 1]])
        best = str(int(ref[i].argmax()))
        assert entry[best]["rank"] == 1
        assert len(entry) == 1 + (best != str(ids[i + 1]))


def test_prompt_logprobs_on_chat_and_in_the_first_streamed_chunk(server):
    with server.client() as c:
        chat = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0},
        ).json()
        assert chat["choices"][0]["prompt_logprobs"][0] is None and len(chat["choices"][0]["prompt_logprobs"]) > 1
        lines = c.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "prompt_logprobs": 0, "stream": True}
        ).text.split("\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "prompt_logprobs" in chunks[0]["choices"][0]
    assert not any("prompt_logprobs" in c["choices"][0] for c in chunks[1:])


def test_max_tokens_0_without_prompt_scoring_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 generates nothing"):
        client.completions.create(model="serve", prompt=PROMPT, max_tokens=0)


def test_logit_bias_forces_and_bans_tokens(client, hf):
    model, tok = hf
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    greedy = int(logp.argmax())
    forced = client.completions.create(model="serve", prompt=ids, max_tokens=3, temperature=0, logit_bias={"200": 100})
    assert forced.choices[0].text == tok.decode([200] * 3)
    banned = client.completions.create(
        model="serve", prompt=ids, max_tokens=1, temperature=0, logprobs=0, logit_bias={str(greedy): -100}
    )
    # logprobs are of the raw distribution: the token taken instead is less likely than the banned one
    assert banned.choices[0].logprobs.token_logprobs[0] < logp[greedy].item() - 1e-6

"""The OpenAI API through the `openai` package against a real server process."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.serve.conftest import API_KEY

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(serve_engine) -> LLMEngine:
    """The same engine in-process: the reference for what the server must return."""
    return LLMEngine.from_dir(serve_engine)


def greedy(offline: LLMEngine, prompt, max_tokens: int, **params) -> tuple[list[int], str, str]:
    (c,) = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **params))
    return c.token_ids, c.text, c.finish_reason


def test_models_lists_the_engine(client):
    (model,) = client.models.list().data
    assert model.id == "serve" and model.owned_by == "llmbuild"


def test_completion_matches_the_offline_engine(client, offline):
    ids, text, reason = greedy(offline, PROMPT, 12, ignore_eos=True)
    r = client.completions.create(
        model="serve", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason == "length"
    assert r.usage.completion_tokens == len(ids) == 12
    assert r.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))


def test_token_id_prompt_and_stop_token(client, offline):
    ids, _, _ = greedy(offline, [5, 6, 7, 8], 10, ignore_eos=True)
    stop_id = ids[3]
    r = client.completions.create(
        model="serve", prompt=[5, 6, 7, 8], max_tokens=10, temperature=0, extra_body={"stop_token_ids": [stop_id]}
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == ids.index(stop_id) + 1


def test_stop_string_is_cut_from_the_text(client, offline):
    _, text, _ = greedy(offline, PROMPT, 16, ignore_eos=True)
    stop = text[5:8]
    r = client.completions.create(
        model="serve", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_streaming_completion_concatenates_to_the_same_text_with_usage_last(client, offline):
    _, text, _ = greedy(offline, PROMPT, 12, ignore_eos=True)
    chunks = list(
        client.completions.create(
            model="serve",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices]) == 12  # one chunk per token


def test_chat_uses_the_engines_template(client, offline, serve_engine):
    tok = AutoTokenizer.from_pretrained(serve_engine / "tokenizer")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    _, text, _ = greedy(offline, list(prompt_ids), 10, ignore_eos=True)
    r = client.chat.completions.create(
        model="serve", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(prompt_ids)


def test_streaming_chat(client, offline, serve_engine):
    messages = [{"role": "user", "content": "Tell me about lists."}]
    full = client.chat.completions.create(model="serve", messages=messages, max_completion_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="serve", messages=messages, max_completion_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_seed_and_sampling_are_reproducible(client, offline):
    kwargs = dict(
        model="serve",
        prompt=PROMPT,
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        n=3,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # each choice draws from its own seed
    assert a.usage.completion_tokens == 3 * 8
    assert a.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))  # the shared prompt counts once


def test_logprobs_match_the_models_distribution(client, offline):
    import torch

    r = client.completions.create(model="serve", prompt=[5, 6, 7], max_tokens=1, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    # reference: one forward pass of the same prompt through the offline engine
    request = offline.make_request([5, 6, 7], SamplingParams(max_tokens=1, temperature=0))
    offline.add_request(request)
    batch = offline.scheduler.schedule()
    logits = offline.runner.execute(batch)[0]
    offline.scheduler.update(batch, [int(logits.argmax())])
    expected = torch.log_softmax(logits.float(), -1)
    assert lp.token_logprobs[0] == pytest.approx(float(expected.max()), abs=1e-4)
    # alternatives are keyed by their text: tokens that decode alike (partial UTF-8 bytes) merge
    assert 1 <= len(lp.top_logprobs[0]) <= 3
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-6)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="serve",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 for t in content)


def test_errors_come_back_as_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="serve", prompt=PROMPT, max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_seq_len|at most"):
        client.completions.create(model="serve", prompt="word " * 400, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base, api_key="wrong", max_retries=0).models.list()


def test_prefix_cache_reuses_a_repeated_system_prompt(client, server):
    system = "You are a helpful assistant who answers questions about Python modules precisely. " * 2
    before = server.metric("llmbuild_prefix_cache_hit_tokens_total")
    first = client.chat.completions.create(
        model="serve",
        max_tokens=4,
        temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "What is a list?"}],
    )
    second = client.chat.completions.create(
        model="serve",
        max_tokens=4,
        temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "What is a dict?"}],
    )
    hits = server.metric("llmbuild_prefix_cache_hit_tokens_total") - before
    assert hits >= 8 * (first.usage.prompt_tokens // 8 - 3)  # all full blocks of the shared system prompt
    assert second.usage.prompt_tokens_details.cached_tokens == hits


def test_unknown_fields_from_extra_body_are_ignored(client, offline):
    _, text, _ = greedy(offline, PROMPT, 6, ignore_eos=True)
    raw = client.completions.with_raw_response.create(
        model="serve",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        user="alice",
        extra_body={"ignore_eos": True, "parallel_tool_calls": False, "mirostat_tau": 5.0},
    )
    assert raw.headers["x-ignored-fields"] == "parallel_tool_calls, mirostat_tau"
    assert raw.parse().choices[0].text == text
    chat = client.chat.completions.create(
        model="serve",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        parallel_tool_calls=False,
        user="alice",
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert chat.usage.completion_tokens <= 2


def test_suffix_is_refused_with_a_clear_message(client):
    with pytest.raises(openai.BadRequestError, match="suffix: insertion .* is not supported"):
        client.completions.create(model="serve", prompt=PROMPT, max_tokens=2, suffix="end")

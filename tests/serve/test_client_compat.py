"""The clients people point at `llmbuild serve`, end to end against one real server process.

- `openai.AsyncOpenAI`: concurrent completions and chat completions (streamed and not, usage in the
  stream), and echo with logprobs, each equal to what the same engine gives offline (LLMEngine).
- The sync `openai` client as SDK-based frameworks (LangChain, LiteLLM) drive it: the fields they add
  (`parallel_tool_calls`, `metadata`, `store`, `stream_options` variants, vendor `extra_body`) are
  accepted, the unknown ones named in X-Ignored-Fields; refused fields raise BadRequestError naming the field
  (`models.retrieve` is in test_status.py).
- Plain httpx: SSE framing of a stream read line by line, the client's X-Request-Id on every chunk,
  /tokenize -> /detokenize, /v1/models/{id}.

lm-eval-harness is not driven here (it takes minutes and its own install): bench/lm_eval_compat.py
records that run, `local-completions` against the server compared with lm-eval's `hf` backend.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.logprobs import TokenLogprobs
from llmbuild.runtime.sampling_params import SamplingParams
from tests.serve.conftest import API_KEY

PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "Paris is the capital of"]
CHATS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}],
]
MAX_TOKENS = 8
USAGE = {"include_usage": True}


@pytest.fixture(scope="module")
def offline(serve_engine) -> LLMEngine:
    """The served engine in-process: the reference for what the server must return."""
    return LLMEngine.from_dir(serve_engine)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=120)


def greedy_text(offline: LLMEngine, prompt: str | list[int], max_tokens: int = MAX_TOKENS) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    (c,) = offline.generate([prompt], params)
    assert len(c.token_ids) == max_tokens
    return c.text


def chat_ids(offline: LLMEngine, messages: list[dict]) -> list[int]:
    """The prompt of `messages` under the engine's chat template, from the tokenizer itself."""
    ids = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def offline_scores(offline: LLMEngine, prompt: str, max_tokens: int, k: int):
    """Prompt ids, the prompt's logprobs (first None) and each generated token's, stepped offline."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=k, prompt_logprobs=k)
    request = offline.make_request(prompt, params)
    offline.add_request(request)
    outs = []
    while offline.has_unfinished():
        outs += [o for o in offline.step() if o.request_id == request.request_id]
    generated: list[TokenLogprobs] = [o.logprobs for o in outs]
    return request.prompt_token_ids, outs[0].prompt_logprobs, generated, "".join(o.text for o in outs)


# --- openai.AsyncOpenAI ---


async def _completion(client: openai.AsyncOpenAI, prompt: str, stream: bool) -> tuple[str, int, int, set[str]]:
    """(text, prompt tokens, completion tokens, response ids) of one greedy completion."""
    kwargs = dict(model="serve", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = await client.completions.create(**kwargs)
        return r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens, {r.id}
    chunks = [c async for c in await client.completions.create(**kwargs, stream=True, stream_options=USAGE)]
    assert not chunks[-1].choices, "the usage chunk comes last"
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].text for c in chunks[:-1])
    return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, {c.id for c in chunks}


async def _chat(client: openai.AsyncOpenAI, messages: list[dict], stream: bool) -> tuple[str, int, int, set[str]]:
    kwargs = dict(
        model="serve", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        assert r.choices[0].message.role == "assistant"
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens, {r.id}
    chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True, stream_options=USAGE)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-1].choices
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, {c.id for c in chunks}


def test_async_client_concurrent_requests_match_the_offline_engine(server, offline):
    async def run() -> list[tuple[str, int, int, set[str]]]:
        async with openai.AsyncOpenAI(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(
                *(_completion(client, p, stream) for p in PROMPTS for stream in (False, True)),
                *(_chat(client, m, stream) for m in CHATS for stream in (False, True)),
            )

    results = asyncio.run(run())
    expected = [(greedy_text(offline, p), len(offline.tokenizer.encode(p))) for p in PROMPTS for _ in range(2)]
    expected += [(greedy_text(offline, ids := chat_ids(offline, m)), len(ids)) for m in CHATS for _ in range(2)]
    assert [(text, prompt_tokens) for text, prompt_tokens, _, _ in results] == expected
    assert all(completion_tokens == MAX_TOKENS for _, _, completion_tokens, _ in results)
    ids = [i for *_, response_ids in results for i in response_ids]
    assert all(len(response_ids) == 1 for *_, response_ids in results), "one id across a stream's chunks"
    assert len(set(ids)) == len(results), "every request its own id"
    assert sum(i.startswith("chatcmpl-") for i in ids) == 2 * len(CHATS)


def test_async_client_echo_with_logprobs_scores_prompt_and_completion(server, offline):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.base, api_key=API_KEY, max_retries=0, timeout=120) as client:
            return await client.completions.create(
                model="serve", prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=2
            )

    r = asyncio.run(run())
    ids, scored, generated, text = offline_scores(offline, PROMPTS[0], 3, 2)
    choice = r.choices[0]
    assert choice.text == PROMPTS[0] + text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3
    lp = choice.logprobs
    assert lp.tokens[: len(ids)] == [offline.tokenizer.decode([i]) for i in ids]
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    want = [s.logprob for s in scored[1:]] + [g.logprob for g in generated]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for top, s in zip(lp.top_logprobs[1:], scored[1:] + generated, strict=True):
        # the 2 best tokens at the position and the token itself (OpenAI: up to logprobs + 1)
        names = {offline.tokenizer.decode([i]) for i, _ in s.top[:2]} | {offline.tokenizer.decode([s.token_id])}
        assert set(top) == names


# --- the sync openai client, as SDK-based frameworks drive it ---


def test_framework_fields_are_accepted_and_the_unknown_ones_named(client, offline):
    messages = CHATS[0]
    raw = client.chat.completions.with_raw_response.create(
        model="serve",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        user="end-user-42",
        parallel_tool_calls=False,
        metadata={"app": "compat-test"},
        store=False,
        tool_choice="none",
        extra_body={"ignore_eos": True, "top_k": 0, "typical_p": 0.9},
    )
    # known fields (user, tool_choice, parallel_tool_calls, the vLLM extensions top_k, ignore_eos) are not named
    ignored = set(raw.headers["x-ignored-fields"].split(", "))
    assert ignored == {"metadata", "store", "typical_p"}
    assert raw.headers["x-request-id"]
    r = raw.parse()
    assert r.id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert r.choices[0].message.content == greedy_text(offline, chat_ids(offline, messages))


@pytest.mark.parametrize(
    ("stream_options", "ignored", "usage_chunk"),
    [
        ({"include_usage": True}, None, True),
        ({"include_usage": False}, None, False),
        ({"include_usage": True, "continuous_usage_stats": True}, "stream_options.continuous_usage_stats", True),
    ],
)
def test_stream_options_variants(client, offline, stream_options, ignored, usage_chunk):
    raw = client.completions.with_raw_response.create(
        model="serve",
        prompt=PROMPTS[1],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options=stream_options,
        extra_body={"ignore_eos": True},
    )
    assert raw.headers.get("x-ignored-fields") == ignored
    chunks = list(raw.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy_text(offline, PROMPTS[1])
    if usage_chunk:
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == MAX_TOKENS
    else:
        assert all(c.choices and c.usage is None for c in chunks)


CHAT_REQUEST = {"model": "serve", "messages": CHATS[0], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "no spaces", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("route", "fields", "match", "param"),
    [
        ("completions", {"suffix": "end"}, r"suffix: insertion .* not supported", "suffix"),
        ("completions", {"best_of": 3}, r"best_of \(3\) different from n \(1\)", "best_of"),
        ("completions", {"max_tokens": 0}, r"max_tokens: 0 generates nothing; it needs echo", "max_tokens"),
        ("completions", {"logit_bias": {str(i): 1 for i in range(301)}}, r"logit_bias: at most 300", "logit_bias"),
        ("chat", {"tools": [TOOL]}, r"tools.0.function.name: String should match pattern", "tools.0.function.name"),
        ("chat", {"tool_choice": "required"}, r"tool_choice 'required' needs tools", "tool_choice"),
        (
            "chat",
            {"response_format": {"type": "json_schema"}},
            r"response_format: type json_schema needs",
            "response_format",
        ),
        ("chat", {"user": "u" * 257}, r"user: ", "user"),
    ],
)
def test_refused_fields_raise_bad_request_naming_the_field(client, route, fields, match, param):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        if route == "completions":
            client.completions.create(model="serve", prompt=PROMPTS[0], **{"max_tokens": 2, **fields})
        else:
            client.chat.completions.create(**{**CHAT_REQUEST, **fields})
    assert info.value.status_code == 400 and info.value.body["code"] == 400
    assert info.value.body["param"] == param


# --- plain httpx ---


@pytest.mark.parametrize(("route", "prefix"), [("/v1/completions", "cmpl"), ("/v1/chat/completions", "chatcmpl")])
def test_httpx_stream_sse_framing_and_request_id(server, offline, route, prefix):
    rid = f"compat-{prefix}-7:a.b_c"
    body = {"model": "serve", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    if prefix == "cmpl":
        body["prompt"], reference = PROMPTS[2], PROMPTS[2]
    else:
        body["messages"], reference = CHATS[1], chat_ids(offline, CHATS[1])
    with server.client() as http, http.stream("POST", route, json=body, headers={"X-Request-Id": rid}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == rid
        lines = list(r.iter_lines())
    # one `data: ` line per event, each followed by a blank line; `[DONE]` last
    assert lines[1::2] == [""] * (len(lines) // 2) and len(lines) % 2 == 0
    events = lines[0::2]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]" and "data: [DONE]" not in events[:-1]
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {c["id"] for c in chunks} == {f"{prefix}-{rid}"}
    if prefix == "cmpl":
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == greedy_text(offline, reference)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_httpx_tokenize_detokenize_round_trip(server, offline):
    text = "Tokenizers split text into pieces, then join them again."
    with server.client() as http:
        plain = http.post("/tokenize", json={"model": "serve", "prompt": text, "add_special_tokens": False}).json()
        special = http.post("/tokenize", json={"prompt": text}).json()
        back = http.post("/detokenize", json={"model": "serve", "tokens": plain["tokens"]}).json()
        completion = http.post("/v1/completions", json={"prompt": special["tokens"], "max_tokens": 1}).json()
    assert plain["tokens"] == offline.tokenizer.encode(text, add_special_tokens=False)
    assert special["tokens"] == offline.tokenizer.encode(text)  # the prompt generation sees, BOS included
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 256
    assert back == {"prompt": text}
    assert completion["usage"]["prompt_tokens"] == special["count"]


def test_httpx_model_by_id(server):
    with server.client() as http:
        ok = http.get("/v1/models/serve")
        missing = http.get("/v1/models/no-such-model")
        unauthenticated = httpx.get(server.url + "/v1/models/serve")
    assert ok.status_code == 200 and ok.json()["id"] == "serve" and ok.json()["max_model_len"] == 256
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["type"] == "not_found_error" and "no-such-model" in error["message"]
    assert unauthenticated.status_code == 401

"""Streamed responses in-process over a fake engine: chunk layout, and errors answered as without streaming."""

from __future__ import annotations

import json

import pytest

from llmbuild.errors import RequestError
from llmbuild.serve.api_error import APIError
from llmbuild.serve.async_engine import EngineDeadError, QueueFullError
from llmbuild.serve.streaming import event

REFUSED = "request needs 99 KV blocks for 3 prompt + 5 new tokens but the cache has 32"


def events(response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_a_completion_streams_one_chunk_per_token_then_usage_and_done(app_client):
    body = {"prompt": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with app_client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
    assert chunks[-1] == "[DONE]"
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["a", "b", "c"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "length"]
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 3


def test_a_chat_stream_starts_with_the_role(app_client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True, "logprobs": True}
    with app_client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = events(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [{"content": "a"}, {"content": "b"}]
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["token"] == "a"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_the_engine_refuses_is_400_streamed_or_not(app_client, fake_llm, stream):
    fake_llm.refuse = REFUSED
    r = app_client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    assert r.status_code == 400, r.text
    assert r.json() == {"error": {"message": REFUSED, "type": "invalid_request_error", "param": None, "code": 400}}
    fake_llm.refuse = None
    assert app_client.post("/v1/completions", json={"prompt": "hi", "stream": stream}).status_code == 200


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (RequestError("bad"), 400, "invalid_request_error"),
        (QueueFullError("full"), 429, "rate_limit_error"),
        (EngineDeadError("dead"), 503, "service_unavailable"),
    ],
)
def test_engine_errors_map_to_one_status_each(exc, status, kind):
    err = APIError.from_engine(exc)
    assert (
        event(err.body())
        == "data: " + json.dumps({"error": {"message": str(exc), "type": kind, "param": None, "code": status}}) + "\n\n"
    )

"""Request models over the wire: unknown fields accepted, ignored and named (log line and
X-Ignored-Fields header); known fields keep their strict checks; `user` accepted, `suffix` refused."""

from __future__ import annotations

import json
import time

import pytest

from llmbuild.serve.protocol import ChatCompletionRequest, CompletionRequest

OK = {"model": "serve", "prompt": "Hello there", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "serve", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def test_ignored_fields_are_dotted_paths_nested_included():
    body = CompletionRequest.model_validate(
        {"prompt": "x", "zeta": 1, "alpha": 2, "stream_options": {"include_usage": True, "continuous_usage_stats": 1}}
    )
    assert body.ignored_fields() == ["zeta", "alpha", "stream_options.continuous_usage_stats"]
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}], "refusal": None},
                {"role": "assistant", "content": "b", "refusal": None},
            ]
        }
    )
    # list items share one path: a long conversation names each unknown key once
    assert chat.ignored_fields() == ["messages.refusal", "messages.content.cache_control"]
    assert CompletionRequest.model_validate({"prompt": "x", "user": "u"}).ignored_fields() == []


def _log_lines(server, marker: str) -> list[str]:
    time.sleep(0.2)  # the server's stderr reaches the file through its own buffer
    return [line for line in server.log.read_text().splitlines() if marker in line]


def test_unknown_fields_are_ignored_named_in_one_log_line_and_a_header(server):
    extras = {"parallel_tool_calls": False, "zz_vendor_extra_1": {"a": 1}}
    with server.client() as c:
        r = c.post("/v1/completions", json={**OK, **extras, "user": "alice"})
        plain = c.post("/v1/completions", json=OK)
    assert r.status_code == 200, r.text
    assert r.headers["x-ignored-fields"] == "parallel_tool_calls, zz_vendor_extra_1"
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    assert "x-ignored-fields" not in plain.headers
    (line,) = _log_lines(server, "zz_vendor_extra_1")
    assert "POST /v1/completions: ignored unknown fields: parallel_tool_calls, zz_vendor_extra_1" in line


def test_a_stream_and_a_chat_carry_the_header_too(server):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json={**body, "zz_vendor_extra_2": 1}) as r:
            assert r.status_code == 200
            assert r.headers["x-ignored-fields"] == "zz_vendor_extra_2, stream_options.continuous_usage_stats"
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert json.loads(events[-1][6:])["usage"]["completion_tokens"] == 2  # the known option still applies
    assert len(_log_lines(server, "zz_vendor_extra_2")) == 1


def test_odd_and_many_unknown_names_stay_one_safe_line(server):
    extras = {"bad\nname": 1, "naïve": 2} | {f"zz_many_{i}": i for i in range(30)}
    with server.client() as c:
        r = c.post("/v1/completions", json={**OK, **extras})
    assert r.status_code == 200, r.text
    named = r.headers["x-ignored-fields"]
    assert named.startswith('"bad\\nname", "na\\u00efve", zz_many_0, ') and named.endswith(", and 12 more")
    assert len(_log_lines(server, "zz_many_0")) == 1


@pytest.mark.parametrize(
    ("route", "fields", "message"),
    [
        ("/v1/completions", {"suffix": "def f():"}, "suffix: insertion (text after the completion) is not supported"),
        ("/v1/completions", {"user": "u" * 257}, "user: String should have at most 256 characters"),
        ("/v1/completions", {"user": 7}, "user: Input should be a valid string"),
        ("/v1/completions", {"max_tokens": "2", "zz_extra": 1}, "max_tokens: Input should be a valid integer"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage:"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5, "x": 1}]}, "messages.0.content:"),
    ],
)
def test_known_fields_stay_strict(server, route, fields, message):
    with server.client() as c:
        r = c.post(route, json={**(OK if route == "/v1/completions" else CHAT), **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(message)

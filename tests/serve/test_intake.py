"""Request intake without a server: body reading under the cap, strict JSON, and the per-request caps."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from llmbuild.serve.api_error import APIError
from llmbuild.serve.intake import (
    check_limits,
    check_prompt_count,
    ignored_fields,
    ignored_header,
    parse_body,
    read_body,
)
from llmbuild.serve.protocol import ChatCompletionRequest, CompletionRequest


def http_request(body: bytes, chunk: int = 512, declare: bool = True) -> Request:
    """A starlette Request whose body arrives in chunks (with or without a Content-Length)."""
    headers = [(b"content-length", str(len(body)).encode())] if declare else []
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive() -> dict:
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def read(ctx, body: bytes, **kwargs) -> CompletionRequest:
    return asyncio.run(read_body(ctx, http_request(body, **kwargs), CompletionRequest))


def test_read_body_validates_into_the_model(serve_context):
    body = read(serve_context, b'{"prompt": "hi", "max_tokens": 3, "stop": "x"}')
    assert body.prompts() == ["hi"] and body.max_tokens == 3 and body.stop_strings == ("x",)


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "streamed"])
def test_read_body_caps_the_size_declared_or_streamed(serve_context, declare):
    big = b'{"prompt": "' + b"x" * 4096 + b'"}'
    with pytest.raises(APIError) as err:
        read(serve_context, big, declare=declare)
    assert err.value.status == 413 and "2048 bytes" in err.value.message


def test_read_body_refuses_while_draining(serve_context):
    serve_context.state.draining = True
    with pytest.raises(APIError) as err:
        read(serve_context, b'{"prompt": "hi"}')
    assert (err.value.status, err.value.kind) == (503, "service_unavailable")


@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (b'{"prompt": "\xff"}', "not valid UTF-8 (byte 12)", None),
        (b"{nope", "not valid JSON", None),
        (b'{"prompt": "x", "temperature": NaN}', "NaN is not a valid JSON number", None),
        (b"[1]", "must be a JSON object", None),
        (b'{"prompt": "x", "suffix": "y"}', "suffix: insertion (text after the completion)", "suffix"),
        (b'{"prompt": "x", "max_tokens": "3"}', "max_tokens:", "max_tokens"),
    ],
)
def test_parse_body_answers_400_naming_the_problem(raw, message, param):
    with pytest.raises(APIError) as err:
        parse_body(raw, CompletionRequest)
    assert err.value.status == 400 and message in err.value.message and err.value.param == param


def test_unknown_fields_pass_and_are_named_safely():
    body = parse_body(
        b'{"prompt": "x", "temprature": 1, "a\\u0000b": 2, "stream_options": {"x": 1}}', CompletionRequest
    )
    assert body.temperature is None  # a typo is ignored, not guessed at
    assert ignored_fields(body) == 'temprature, "a\\u0000b", stream_options.x'
    assert ignored_header(body) == {"X-Ignored-Fields": 'temprature, "a\\u0000b", stream_options.x'}
    assert ignored_header(parse_body(b'{"prompt": "x"}', CompletionRequest)) == {}


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **fields})


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"model": "gpt-4"}, 404, "model 'gpt-4' does not exist; this server serves 'fake'"),
        ({"n": 5}, 400, "n: at most 4 (got 5)"),
        ({"logprobs": 6}, 400, "logprobs: at most 5 (got 6)"),
        ({"stop": ["a", "b", "c"]}, 400, "stop: at most 2 stop sequences (got 3)"),
        ({"stop": ["123456789"]}, 400, "stop: each stop sequence must have 1 to 8 characters"),
    ],
)
def test_check_limits(serve_context, fields, status, message):
    with pytest.raises(APIError) as err:
        check_limits(serve_context, completion(**fields))
    assert (err.value.status, err.value.message) == (status, message)
    check_limits(serve_context, completion(model="fake", n=4, logprobs=5, stop=["a", "b"]))


def test_check_limits_names_the_chat_logprobs_field(serve_context):
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 9}
    )
    with pytest.raises(APIError) as err:
        check_limits(serve_context, body)
    assert err.value.param == "top_logprobs" and err.value.message == "top_logprobs: at most 5 (got 9)"


def test_check_prompt_count(serve_context):
    check_prompt_count(serve_context, ["a", "b", "c"])
    with pytest.raises(APIError, match=r"prompt: at most 3 prompts per request \(got 4\)"):
        check_prompt_count(serve_context, ["a", "b", "c", "d"])

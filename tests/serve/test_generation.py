"""Engine requests from request bodies, without a server: sampling defaults, caps, n choices and seeds."""

from __future__ import annotations

import pytest

from llmbuild.serve.api_error import APIError
from llmbuild.serve.generation import make_requests, sampling_params
from llmbuild.serve.protocol import ChatCompletionRequest, CompletionRequest


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **fields})


def test_unset_options_come_from_the_engine_defaults(serve_context):
    p = sampling_params(serve_context, completion())
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (5, 0.5, 0.9, 7)
    p = sampling_params(serve_context, completion(max_tokens=3, temperature=0.0, top_p=1.0, top_k=-1, seed=4))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (3, 0.0, 1.0, 0, 4)


def test_max_tokens_is_capped_at_max_seq_len(serve_context):
    assert sampling_params(serve_context, completion(max_tokens=10**6)).max_tokens == 64


def test_chat_takes_max_completion_tokens_and_top_logprobs(serve_context):
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2, "logprobs": True}
    )
    p = sampling_params(serve_context, body)
    assert p.max_tokens == 2 and p.logprobs == 0


def test_options_sampling_refuses_are_400(serve_context):
    with pytest.raises(APIError) as err:
        sampling_params(serve_context, completion(max_tokens=2, min_tokens=3))
    assert err.value.status == 400 and "min_tokens" in err.value.message


def test_n_requests_per_prompt_with_consecutive_seeds(serve_context):
    params = sampling_params(serve_context, completion(seed=2**63 - 1))
    requests = make_requests(serve_context, ["ab", [7, 8]], params, n=2, request_id="rid", priority=3)
    assert [r.prompt_token_ids for r in requests] == [[1, 100, 101]] * 2 + [[7, 8]] * 2
    assert [r.params.seed for r in requests] == [2**63 - 1, 0, 2**63 - 1, 0]
    assert {r.priority for r in requests} == {3}
    assert [r.request_id for r in requests] == ["rid-0", "rid-1", "rid-2", "rid-3"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt: must not be empty"),
        ([5] * 64, "prompt has 64 tokens; this server accepts at most 63"),
        ([5, 5000], "prompt token id is out of range"),
    ],
)
def test_bad_prompts_are_400_naming_the_prompt(serve_context, prompt, message):
    with pytest.raises(APIError) as err:
        make_requests(serve_context, [prompt], sampling_params(serve_context, completion()), n=1, request_id="rid")
    assert err.value.status == 400 and err.value.param == "prompt" and message in err.value.message

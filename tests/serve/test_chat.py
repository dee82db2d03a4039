"""Chat requests without a server: the template's prompt, its failures, and a whole chat response."""

from __future__ import annotations

import pytest

from llmbuild.serve.api_error import APIError
from llmbuild.serve.chat import chat_prompt, chat_requests
from llmbuild.serve.protocol import ChatCompletionRequest


def chat(*messages: tuple[str, str], **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": r, "content": c} for r, c in messages], **fields}
    )


def test_chat_requests_take_the_templated_prompt_and_the_body_options(serve_context, fake_llm):
    body = chat(("system", "be brief"), ("user", "hi"), n=2, max_tokens=3, seed=1)
    requests = chat_requests(serve_context, body, "rid")
    expected = fake_llm.tokenizer.encode("system: be brief\nuser: hi\nassistant: ")
    assert [r.prompt_token_ids for r in requests] == [expected, expected]
    assert [r.params.seed for r in requests] == [1, 2] and requests[0].params.max_tokens == 3


def test_text_parts_are_joined_and_the_generation_prompt_is_optional(serve_context, fake_llm):
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "add_generation_prompt": False,
        }
    )
    assert chat_prompt(serve_context, body) == fake_llm.tokenizer.encode("user: ab\n")


def test_a_template_that_refuses_the_messages_is_400(serve_context):
    with pytest.raises(APIError) as err:
        chat_prompt(serve_context, chat(("tool", "42")))
    assert err.value.status == 400 and err.value.param == "messages"
    assert err.value.message == "messages do not fit the engine's chat template: unknown role tool"


def test_a_tokenizer_without_template_is_400(serve_context, fake_llm):
    fake_llm.tokenizer.chat_template = None
    with pytest.raises(APIError) as err:
        chat_prompt(serve_context, chat(("user", "hi")))
    assert err.value.message == "this engine's tokenizer has no chat template; use /v1/completions"


def test_chat_completion_in_process(app_client):
    r = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "fake"
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "abc"}, "logprobs": None, "finish_reason": "length"}
    ]
    assert out["usage"]["completion_tokens"] == 3

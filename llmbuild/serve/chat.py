"""POST /v1/chat/completions: messages through the engine's chat template, n choices."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response

from llmbuild.runtime.chat_template import (
    ChatTemplateError,
    NoChatTemplateError,
    NoToolTemplateError,
    apply_chat_template,
)
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve.api_error import APIError
from llmbuild.serve.context import ServeContext
from llmbuild.serve.generation import make_requests, sampling_params
from llmbuild.serve.intake import adapter_of, check_limits, read_body
from llmbuild.serve.protocol import ChatCompletionRequest
from llmbuild.serve.request_log import request_record
from llmbuild.serve.responses import respond


async def create_chat_completion(ctx: ServeContext, request: Request) -> Response:
    """The route's handler: read, check, apply the template, queue, answer."""
    body = await read_body(ctx, request, ChatCompletionRequest)
    requests = await asyncio.to_thread(chat_requests, ctx, body, request_record(request).id)
    return await respond(ctx, request, body, requests, chat=True)


def chat_requests(ctx: ServeContext, body: ChatCompletionRequest, request_id: str) -> list[EngineRequest]:
    """The engine requests of a chat body, after the server's caps (tokenizes: off the event loop)."""
    check_limits(ctx, body)
    prompt = chat_prompt(ctx, body)  # a template that cannot render the tools: 400 before any grammar compiles
    params = sampling_params(ctx, body)
    return make_requests(ctx, [prompt], params, body.n, request_id, body.priority, adapter_of(ctx, body.model))


def chat_prompt(ctx: ServeContext, body: ChatCompletionRequest) -> list[int]:
    """The prompt token ids of the body's messages (and tools) under the engine's chat template (400 if
    none fits)."""
    try:
        return apply_chat_template(
            ctx.tokenizer, body.template_messages(), body.add_generation_prompt, body.template_tools()
        )
    except NoChatTemplateError as exc:
        raise APIError(400, f"{exc}; use /v1/completions") from None
    except NoToolTemplateError as exc:
        raise no_tools(exc, bool(body.tools)) from None
    except ChatTemplateError as exc:
        raise APIError(400, f"messages do not fit the engine's chat template: {exc}", param="messages") from None


def no_tools(exc: NoToolTemplateError, has_tools: bool) -> APIError:
    """The 400 for tools (or, without them, history tool calls) on a template that cannot render them."""
    param = "tools" if has_tools else "messages"
    return APIError(400, f"{param}: {exc}; leave tools and tool calls out", param=param)

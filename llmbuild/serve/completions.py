"""POST /v1/completions: one or more prompts (text or token ids), n choices each."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response

from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve.context import ServeContext
from llmbuild.serve.generation import make_requests, sampling_params
from llmbuild.serve.intake import adapter_of, check_limits, check_prompt_count, read_body
from llmbuild.serve.protocol import CompletionRequest
from llmbuild.serve.request_log import request_record
from llmbuild.serve.responses import respond


async def create_completion(ctx: ServeContext, request: Request) -> Response:
    """The route's handler: read, check, queue, answer."""
    body = await read_body(ctx, request, CompletionRequest)
    requests = await asyncio.to_thread(completion_requests, ctx, body, request_record(request).id)
    echo = [p if isinstance(p, str) else ctx.tokenizer.decode(p) for p in body.prompts()] if body.echo else None
    return await respond(ctx, request, body, requests, chat=False, echo=echo)


def completion_requests(ctx: ServeContext, body: CompletionRequest, request_id: str) -> list[EngineRequest]:
    """The engine requests of a completion body, after the server's caps (tokenizes: off the event loop)."""
    prompts = body.prompts()
    check_prompt_count(ctx, prompts)
    check_limits(ctx, body)
    params = sampling_params(ctx, body)
    return make_requests(ctx, prompts, params, body.n, request_id, body.priority, adapter_of(ctx, body.model))

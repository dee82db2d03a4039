"""Answering a generation request: queue its engine requests, then stream them or answer whole."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llmbuild.errors import LLMBuildError
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve import protocol
from llmbuild.serve.api_error import APIError
from llmbuild.serve.async_engine import RequestStream
from llmbuild.serve.choice import Choice, PromptEcho, usage
from llmbuild.serve.context import ServeContext
from llmbuild.serve.intake import adapter_of, ignored_header
from llmbuild.serve.logprobs import LogprobsBuilder
from llmbuild.serve.protocol import GenerationRequest
from llmbuild.serve.request_log import RequestRecord, request_record
from llmbuild.serve.streaming import ChunkHeader, sse, stream_events
from llmbuild.serve.tools import message_with_calls


async def respond(
    ctx: ServeContext,
    request: Request,
    body: GenerationRequest,
    requests: list[EngineRequest],
    chat: bool,
    echo: list[str] | None = None,
) -> Response:
    """Queue the requests; stream SSE events or answer with the whole completion.

    `echo`: the prompts' texts, one per prompt, to return before each choice's text (completions'
    echo). A stream starts only once the engine has admitted every request, so a request it refuses
    gets the same status as without streaming.
    """
    stream = submit(ctx, requests)
    record = request_record(request)
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{record.id}", protocol.now()
    model = adapter_of(ctx, body.model) or ctx.model_name  # an adapter answers as itself
    choices = [make_choice(ctx, body, r, chat, echo[i // body.n] if echo else None) for i, r in enumerate(requests)]
    record.requests, record.choices, record.n, record.streamed = requests, choices, body.n, body.stream
    if body.stream:
        try:
            await stream.admitted()
        except LLMBuildError as exc:
            raise APIError.from_engine(exc) from None
        header = ChunkHeader(rid, created, model, chat)
        response = sse(stream_events(stream, requests, choices, header, body, record))
        response.headers.update(ignored_header(body))
        return response
    await collect(stream, choices, request, record)
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [_choice_body(i, c, chat) for i, c in enumerate(choices)],
            "usage": usage(requests, choices, body.n),
        },
        headers=ignored_header(body),
    )


def make_choice(
    ctx: ServeContext, body: GenerationRequest, request: EngineRequest, chat: bool, echo: str | None
) -> Choice:
    """An empty choice for one engine request, set up for the logprobs and prompt parts the body asks for."""
    k = body.num_logprobs
    prompt = None
    if echo is not None or body.prompt_logprobs is not None:
        prompt = PromptEcho(request.prompt_token_ids, ctx.decode, echo, body.prompt_logprobs)
    tools = body.tool_calling
    return Choice(
        logprobs=LogprobsBuilder(ctx.decode, chat, k) if k is not None else None,
        prompt=prompt,
        generates=body.requested_max_tokens != 0,
        tools=tools.parser() if tools is not None else None,
    )


def submit(ctx: ServeContext, requests: list[EngineRequest]) -> RequestStream:
    """Hand the requests to the engine: 429 when its queue is full, 503 when it has stopped."""
    try:
        return ctx.engine.generate(requests)
    except LLMBuildError as exc:
        raise APIError.from_engine(exc) from None


async def collect(stream: RequestStream, choices: list[Choice], request: Request, record: RequestRecord) -> None:
    """Run a non-streaming request to the end; abort it if the client goes away first."""

    async def consume() -> None:
        async for index, out in stream:
            if record.first_token is None:
                record.first_token = time.perf_counter()
            choices[index].add(out)

    task = asyncio.ensure_future(consume())
    try:
        # a client that left stops costing KV blocks within a tenth of a second
        while not (await asyncio.wait({task}, timeout=0.1))[0]:
            if await request.is_disconnected():
                task.cancel()
                return
        task.result()
    except LLMBuildError as exc:
        raise APIError.from_engine(exc) from None
    finally:
        stream.close()


def _choice_body(index: int, choice: Choice, chat: bool) -> dict[str, Any]:
    text = "".join(choice.text)
    result: dict[str, Any] = {"index": index}
    if chat:
        result["message"] = {"role": "assistant", "content": text}
        if choice.tools is not None:
            result["message"] = message_with_calls(choice.tools, text)
    else:
        result["text"] = text
    result["logprobs"] = choice.logprobs.body() if choice.logprobs else None
    result["finish_reason"] = choice.reported_finish_reason()
    if choice.prompt_logprobs is not None:
        result["prompt_logprobs"] = choice.prompt_logprobs
    return result

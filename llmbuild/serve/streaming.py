"""Streaming responses: a completion as server-sent events, one chunk per generated token."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from llmbuild.errors import RequestError
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve.api_error import APIError
from llmbuild.serve.async_engine import EngineDeadError, RequestStream
from llmbuild.serve.choice import Choice, usage
from llmbuild.serve.protocol import GenerationRequest
from llmbuild.serve.request_log import RequestRecord


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The fields every chunk of one streamed response repeats."""

    id: str
    created: int
    model: str
    chat: bool

    def chunk(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        """One SSE event of these choices (and, when the client asked for usage, the usage field)."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = usage
        return event(out)


async def stream_events(
    stream: RequestStream,
    requests: list[EngineRequest],
    choices: list[Choice],
    header: ChunkHeader,
    body: GenerationRequest,
    record: RequestRecord,
) -> AsyncIterator[str]:
    """SSE events of a streaming completion (chat: deltas after a role chunk; else text pieces).

    An error after the headers went out ends the stream with an error event, whose code is the
    status the same error gets without streaming.
    """
    include_usage = body.include_usage
    try:
        if header.chat:
            for i in range(len(choices)):
                role = {"role": "assistant", "content": ""}
                yield header.chunk(
                    [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}], include_usage
                )
        async for index, out in stream:
            if record.first_token is None:
                record.first_token = time.perf_counter()
            c = choices[index]
            first = not c.text
            text = c.add(out)
            # one chunk per token, even when its text is held back (a partial character or a
            # possible stop-string prefix), so clients can count tokens and time each one
            piece: dict[str, Any] = {"index": index}
            if header.chat:
                piece["delta"] = chat_delta(c, text, out.finish_reason is not None)
            else:
                piece["text"] = text
            piece["logprobs"] = c.logprobs.take() if c.logprobs else None
            piece["finish_reason"] = c.reported_finish_reason() if out.finish_reason else None
            if first and c.prompt_logprobs is not None:
                piece["prompt_logprobs"] = c.prompt_logprobs
            yield header.chunk([piece], include_usage)
        if include_usage:
            yield header.chunk([], include_usage, usage(requests, choices, body.n))
        yield "data: [DONE]\n\n"
    except (EngineDeadError, RequestError) as exc:
        error = APIError.from_engine(exc)
        record.error = error.kind
        yield event(error.body())
    finally:
        stream.close()


def chat_delta(choice: Choice, text: str, finished: bool) -> dict[str, Any]:
    """The delta of a chat chunk: the new content and, for a choice that may call tools, each call whose
    <tool_call> block this text completes (a block's text is never content)."""
    if choice.tools is None:
        return {"content": text} if text or not finished else {}
    content, calls = choice.tools.feed(text)
    if finished:
        content += choice.tools.finish()
    delta: dict[str, Any] = {"content": content} if content or not (finished or calls) else {}
    if calls:
        delta["tool_calls"] = calls
    return delta


def event(body: dict) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    """A response streaming `events` as they come."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

"""Request ids and the one log line per finished HTTP request.

Every request gets an id: the client's X-Request-Id when it is valid (a 400 naming the header
when it is not), else a new uuid4 hex. The id comes back in the X-Request-Id response header,
suffixes the response's `id`, names its engine requests and appears in every log line about it.

RequestLogMiddleware is plain ASGI, so a streamed response passes through it untouched. Handlers
fill the request's RequestRecord as they go (a few attribute writes); the log line is built once,
when the response has ended, and only when the `llmbuild.serve.requests` logger would show it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve.api_error import APIError
from llmbuild.serve.choice import Choice, usage

log = logging.getLogger("llmbuild.serve.requests")

REQUEST_ID_HEADER = "X-Request-Id"
ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -"
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_STATE_KEY = "request_record"


@dataclass(eq=False, slots=True)
class RequestRecord:
    """What one request's log line reports, filled in while it runs and read once at its end."""

    id: str
    start: float = field(default_factory=time.perf_counter)
    status: int = 0
    """The response's status (0 until its headers are sent)."""
    error: str | None = None
    """The OpenAI error type of a failed request (or of an error event ending a stream)."""
    streamed: bool = False
    first_token: float | None = None
    """perf_counter() when the first output of any choice reached the event loop."""
    requests: list[EngineRequest] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    n: int = 1

    def fields(self, method: str, route: str, end: float) -> dict[str, Any]:
        """The log line's fields; generation ones are None for a request that generated nothing."""
        tokens = usage(self.requests, self.choices, self.n) if self.requests else {}
        return {
            "request_id": self.id,
            "method": method,
            "route": route,
            "status": self.status,
            "streamed": self.streamed,
            "prompt_tokens": tokens.get("prompt_tokens"),
            "completion_tokens": tokens.get("completion_tokens"),
            "cached_tokens": tokens.get("prompt_tokens_details", {}).get("cached_tokens", 0) if tokens else None,
            "ttft_ms": None if self.first_token is None else round((self.first_token - self.start) * 1e3, 2),
            "e2e_ms": round((end - self.start) * 1e3, 2),
            "finish_reasons": [c.finish_reason for c in self.choices] if self.choices else None,
            "error": self.error,
        }


def request_record(request: Request) -> RequestRecord:
    """The record of `request`, which RequestLogMiddleware made before any handler ran."""
    return getattr(request.state, _STATE_KEY)


class KeyValues:
    """A log line's fields as `key=value` text, rendered only if a text handler formats it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.fields.items() if v is not None)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join("-" if v is None else str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


class RequestLogMiddleware:
    """Gives every HTTP request its id and header, and logs one line when its response has ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        valid = given is None or _VALID_ID.fullmatch(given) is not None
        record = RequestRecord(given if given is not None and valid else uuid.uuid4().hex)
        scope.setdefault("state", {})[_STATE_KEY] = record
        id_header = (b"x-request-id", record.id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            if valid:
                await self.app(scope, receive, send_with_id)
            else:
                # never echo the rejected value: it may be huge or hold control characters
                error = APIError(400, f"{REQUEST_ID_HEADER} header: must be {ID_RULE}", param=REQUEST_ID_HEADER)
                record.error = error.kind
                await error.response()(scope, receive, send_with_id)
        except Exception:
            record.status, record.error = record.status or 500, record.error or "internal_error"
            raise
        finally:
            if log.isEnabledFor(logging.INFO):
                # the matched route's template: a path is the client's text, and may hold anything
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                fields = record.fields(scope["method"], route, time.perf_counter())
                log.info("request %s", KeyValues(fields), extra={"fields": fields})

"""Request intake: a body read under the size cap, decoded as strict UTF-8 JSON, validated, and
checked against the server's per-request caps before anything reaches the engine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from llmbuild.serve import protocol
from llmbuild.serve.api_error import APIError
from llmbuild.serve.context import ServeContext
from llmbuild.serve.protocol import GenerationRequest, Prompt

Body = TypeVar("Body", bound=BaseModel)


async def read_body(ctx: ServeContext, request: Request, model: type[Body]) -> Body:
    """The request's body as `model`: 503 while draining, 413 over the size cap, 400 if malformed."""
    if ctx.state.draining:
        raise APIError(503, "server is shutting down; retry on another replica", "service_unavailable")
    limit = ctx.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"request body is larger than the limit of {limit} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes")
    return parse_body(bytes(raw), model)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """Decode `raw` as UTF-8 JSON (no NaN or Infinity) holding one object, and validate it as `model`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = protocol.describe_validation_error(exc)
        raise APIError(400, message, param=param) from None


def check_limits(ctx: ServeContext, body: GenerationRequest) -> None:
    """The served model's name and the caps on n, logprobs and stop sequences (404 or 400)."""
    config, name = ctx.config, ctx.model_name
    if body.model is not None and body.model != name:
        raise APIError(
            404, f"model '{body.model}' does not exist; this server serves '{name}'", "not_found_error", "model"
        )
    if body.n > config.max_n:
        raise APIError(400, f"n: at most {config.max_n} (got {body.n})", param="n")
    logprobs, param = body.num_logprobs, body.logprobs_param
    if logprobs is not None and logprobs > config.max_top_logprobs:
        raise APIError(400, f"{param}: at most {config.max_top_logprobs} (got {logprobs})", param=param)
    stops = body.stop_strings
    if len(stops) > config.max_stop:
        raise APIError(400, f"stop: at most {config.max_stop} stop sequences (got {len(stops)})", param="stop")
    if any(not s or len(s) > config.max_stop_len for s in stops):
        raise APIError(400, f"stop: each stop sequence must have 1 to {config.max_stop_len} characters", param="stop")


def check_prompt_count(ctx: ServeContext, prompts: Sequence[Prompt]) -> None:
    """At most `max_prompts` prompts in one /v1/completions request."""
    most = ctx.config.max_prompts
    if len(prompts) > most:
        raise APIError(400, f"prompt: at most {most} prompts per request (got {len(prompts)})", param="prompt")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")

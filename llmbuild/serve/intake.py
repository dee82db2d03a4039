"""Request intake: a body read under the size cap, decoded as strict UTF-8 JSON, validated, and
checked against the server's per-request caps before anything reaches the engine.

Unknown fields pass validation (protocol.py); intake names them in one warning line per request
and the answer names them in its X-Ignored-Fields header, so a client learns what had no effect.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError

from llmbuild.serve import protocol
from llmbuild.serve.api_error import APIError
from llmbuild.serve.context import ServeContext
from llmbuild.serve.protocol import GenerationRequest, Prompt, RequestModel
from llmbuild.serve.request_log import request_record

Body = TypeVar("Body", bound=RequestModel)

log = logging.getLogger(__name__)

IGNORED_FIELDS_HEADER = "X-Ignored-Fields"
_MOST_NAMED = 20
"""Unknown fields named in the log line and the header; a body of thousands of keys stays one short line."""
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


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
    body = parse_body(bytes(raw), model)
    if ignored := ignored_fields(body):
        rid = request_record(request).id
        log.warning(
            "request_id=%s %s %s: ignored unknown fields: %s",
            rid,
            request.method,
            request.url.path,
            ignored,
            extra={"request_id": rid},
        )
    return body


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
        message, param = protocol.describe_validation_error(exc, model.model_fields)
        raise APIError(400, message, param=param) from None


def ignored_fields(body: RequestModel) -> str:
    """The body's unknown fields as one line of printable ASCII ('' for none), safe in a log or a header.

    Names other than plain identifiers are JSON-quoted (ASCII escapes), so that a key holding a
    newline or non-Latin-1 text can neither forge a log line nor break the header.
    """
    names = body.ignored_fields()
    shown = [n if _PLAIN_NAME.fullmatch(n) else json.dumps(n[:64]) for n in names[:_MOST_NAMED]]
    if len(names) > _MOST_NAMED:
        shown.append(f"and {len(names) - _MOST_NAMED} more")
    return ", ".join(shown)


def ignored_header(body: RequestModel) -> dict[str, str]:
    """The X-Ignored-Fields header of the answer to `body` (empty when it had no unknown fields)."""
    ignored = ignored_fields(body)
    return {IGNORED_FIELDS_HEADER: ignored} if ignored else {}


def check_model(ctx: ServeContext, model: str | None) -> None:
    """404 naming the served models when a request names none of them: the base model or a LoRA adapter
    (None: any route's default, the base model)."""
    if model is not None and model != ctx.model_name and model not in ctx.adapter_names():
        served = ", ".join(f"'{name}'" for name in (ctx.model_name, *ctx.adapter_names()))
        raise APIError(404, f"model '{model}' does not exist; this server serves {served}", "not_found_error", "model")


def adapter_of(ctx: ServeContext, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base model)."""
    return None if model is None or model == ctx.model_name else model


def check_limits(ctx: ServeContext, body: GenerationRequest) -> None:
    """The served model's name and the caps on n, logprobs, logit_bias and stop sequences (404 or 400)."""
    config = ctx.config
    check_model(ctx, body.model)
    if body.n > config.max_n:
        raise APIError(400, f"n: at most {config.max_n} (got {body.n})", param="n")
    for param, logprobs in ((body.logprobs_param, body.num_logprobs), ("prompt_logprobs", body.prompt_logprobs)):
        if logprobs is not None and logprobs > config.max_top_logprobs:
            raise APIError(400, f"{param}: at most {config.max_top_logprobs} (got {logprobs})", param=param)
    bias = body.logit_bias_pairs
    if len(bias) > config.max_logit_bias:
        raise APIError(400, f"logit_bias: at most {config.max_logit_bias} tokens (got {len(bias)})", param="logit_bias")
    outside = next((t for t, _ in bias if t >= ctx.vocab_size), None)
    if outside is not None:
        message = f"logit_bias: token id {outside} is out of range [0, {ctx.vocab_size})"
        raise APIError(400, message, param="logit_bias")
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

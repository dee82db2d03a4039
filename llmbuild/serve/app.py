"""The OpenAI-compatible HTTP app: routes, authentication, request limits and streaming.

Every request body is read under a size cap, decoded as strict UTF-8 JSON and validated by the
models in protocol.py before anything reaches the engine; every failure is an OpenAI-style error
body with a 4xx status, and never touches other requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmbuild.errors import RequestError
from llmbuild.runtime.llm_engine import RequestOutput
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.runtime.sampling_params import SamplingParams
from llmbuild.serve import protocol
from llmbuild.serve.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from llmbuild.serve.config import ServeConfig
from llmbuild.serve.protocol import ChatCompletionRequest, CompletionRequest, LogprobsBuilder


class APIError(Exception):
    """An HTTP error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class ServerState:
    draining: bool = False
    """Set on SIGTERM: in-flight requests finish, new ones get 503."""


@dataclass
class _Choice:
    """One choice of a response as it accumulates."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: LogprobsBuilder | None = None
    offset: int = 0


def create_app(engine: AsyncEngine, config: ServeConfig, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (whose step loop runs elsewhere); stops the loop on shutdown."""
    llm = engine.llm
    manifest = llm.engine.manifest
    model_name = config.model_name or manifest.name
    max_seq_len = manifest.limits.max_seq_len
    max_prompt = min(config.max_prompt_tokens or max_seq_len - 1, max_seq_len - 1)
    tokenizer = llm.tokenizer
    state = state or ServerState()
    keys = [k.encode() for k in config.api_keys]
    started = protocol.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.stop()  # in-flight requests have drained by now (or were cut off at the timeout)

    app = FastAPI(title="llmbuild", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(protocol.error_body(exc.message, exc.kind, exc.param, exc.status), exc.status, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(protocol.error_body(str(exc.detail), kind, None, exc.status_code), exc.status_code)

    async def authenticate(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare against every key, always, so timing reveals neither the key nor which one matched
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(
                401, "missing or invalid API key; send 'Authorization: Bearer <key>'", "authentication_error"
            )

    guarded = [Depends(authenticate)]

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process answers and the engine loop runs (no key needed, for probes)."""
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", dependencies=guarded)
    async def ready() -> Response:
        """Readiness: the engine is loaded and the server takes new requests."""
        if state.draining or not engine.alive:
            return JSONResponse({"status": "draining" if state.draining else "engine stopped"}, 503)
        return JSONResponse({"status": "ready", "model": model_name})

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": started,
                    "owned_by": "llmbuild",
                    "max_model_len": max_seq_len,
                }
            ],
        }

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        body = await _read(request, CompletionRequest)
        prompts = body.prompts()
        if len(prompts) > config.max_prompts:
            raise APIError(
                400, f"prompt: at most {config.max_prompts} prompts per request (got {len(prompts)})", param="prompt"
            )
        _check_common(body, body.logprobs)
        params = _sampling_params(body, body.max_tokens, body.logprobs)
        requests = await asyncio.to_thread(_make_requests, prompts, params, body)
        return await _respond(request, body, requests, body.logprobs is not None, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        body = await _read(request, ChatCompletionRequest)
        _check_common(body, body.num_logprobs, logprobs_param="top_logprobs")
        params = _sampling_params(body, body.requested_max_tokens, body.num_logprobs)
        ids = await asyncio.to_thread(_chat_prompt, body)
        requests = await asyncio.to_thread(_make_requests, [ids], params, body)
        return await _respond(request, body, requests, body.logprobs, chat=True)

    # --- request handling -------------------------------------------------------------------

    async def _respond(
        request: Request, body: Any, requests: list[EngineRequest], logprobs: bool, chat: bool
    ) -> Response:
        """Queue the requests; stream SSE events or answer with the whole completion."""
        stream = _submit(requests)
        rid, created = protocol.new_id("chatcmpl" if chat else "cmpl"), protocol.now()
        choices = [_Choice(logprobs=LogprobsBuilder(_decode, chat) if logprobs else None) for _ in requests]
        if body.stream:
            return _sse(_stream_events(stream, requests, choices, rid, created, body, chat))
        await _collect(stream, choices, request)
        results = []
        for i, c in enumerate(choices):
            text = "".join(c.text)
            result: dict[str, Any] = {"index": i}
            if chat:
                result["message"] = {"role": "assistant", "content": text}
            else:
                result["text"] = text
            result["logprobs"] = c.logprobs.body() if c.logprobs else None
            result["finish_reason"] = c.finish_reason
            results.append(result)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model_name,
                "choices": results,
                "usage": _usage(requests, choices, body.n),
            }
        )

    async def _read(request: Request, model: type[BaseModel]) -> Any:
        if state.draining:
            raise APIError(503, "server is shutting down; retry on another replica", "service_unavailable")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body_bytes):
            raise APIError(413, f"request body is larger than the limit of {config.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > config.max_body_bytes:
                raise APIError(413, f"request body is larger than the limit of {config.max_body_bytes} bytes")
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

    def _check_common(
        body: protocol._GenerationRequest, logprobs: int | None, logprobs_param: str = "logprobs"
    ) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(
                404,
                f"model '{body.model}' does not exist; this server serves '{model_name}'",
                "not_found_error",
                "model",
            )
        if body.n > config.max_n:
            raise APIError(400, f"n: at most {config.max_n} (got {body.n})", param="n")
        if logprobs is not None and logprobs > config.max_top_logprobs:
            raise APIError(
                400, f"{logprobs_param}: at most {config.max_top_logprobs} (got {logprobs})", param=logprobs_param
            )
        stops = body.stop_strings
        if len(stops) > config.max_stop:
            raise APIError(400, f"stop: at most {config.max_stop} stop sequences (got {len(stops)})", param="stop")
        if any(not s or len(s) > config.max_stop_len for s in stops):
            raise APIError(
                400, f"stop: each stop sequence must have 1 to {config.max_stop_len} characters", param="stop"
            )

    def _sampling_params(
        body: protocol._GenerationRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        defaults = manifest.serve
        top_k = defaults.top_k if body.top_k is None else max(body.top_k, 0)
        try:
            return SamplingParams(
                max_tokens=min(max_tokens or defaults.max_tokens, max_seq_len),
                temperature=defaults.temperature if body.temperature is None else body.temperature,
                top_p=defaults.top_p if body.top_p is None else body.top_p,
                top_k=top_k,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                seed=body.seed,
                stop=body.stop_strings,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
                min_tokens=body.min_tokens,
                skip_special_tokens=body.skip_special_tokens,
                logprobs=logprobs,
            )
        except RequestError as exc:
            raise APIError(400, str(exc)) from None

    def _make_requests(prompts: list[str | list[int]], params: SamplingParams, body: Any) -> list[EngineRequest]:
        """n requests per prompt; with a seed, choice j draws from seed + j so choices differ."""
        requests = []
        for prompt in prompts:
            if not prompt:  # "" would still tokenize to a BOS token: refuse it as the empty prompt it is
                raise APIError(400, "prompt: must not be empty", param="prompt")
            ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            if len(ids) > max_prompt:
                raise APIError(
                    400, f"prompt has {len(ids)} tokens; this server accepts at most {max_prompt}", param="prompt"
                )
            for j in range(body.n):
                p = params
                if params.seed is not None and j:
                    p = replace(params, seed=(params.seed + j) % (2**63))
                try:
                    requests.append(llm.make_request(ids, p, priority=body.priority))
                except RequestError as exc:
                    raise APIError(400, str(exc), param="prompt") from None
        return requests

    def _chat_prompt(body: ChatCompletionRequest) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this engine's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, tokenize=True, return_dict=False
            )
        except Exception as exc:  # noqa: BLE001 - templates raise what their authors chose (jinja2 errors)
            raise APIError(400, f"messages do not fit the engine's chat template: {exc}", param="messages") from None
        return list(ids)

    def _submit(requests: list[EngineRequest]) -> RequestStream:
        try:
            return engine.generate(requests)
        except QueueFullError as exc:
            raise APIError(429, str(exc), "rate_limit_error") from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "service_unavailable") from None

    def _decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def _add(choice: _Choice, out: RequestOutput) -> None:
        choice.num_tokens += 1
        if choice.logprobs is not None and out.logprobs is not None:
            choice.logprobs.add(out.logprobs, choice.offset)
        choice.text.append(out.text)
        choice.offset += len(out.text)
        choice.finish_reason = out.finish_reason

    async def _collect(stream: RequestStream, choices: list[_Choice], request: Request) -> None:
        """Run a non-streaming request to the end; abort it if the client goes away first."""

        async def consume() -> None:
            async for index, out in stream:
                _add(choices[index], out)

        task = asyncio.ensure_future(consume())
        try:
            # a client that left stops costing KV blocks within a tenth of a second
            while not (await asyncio.wait({task}, timeout=0.1))[0]:
                if await request.is_disconnected():
                    task.cancel()
                    return
            task.result()
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "service_unavailable") from None
        except RequestError as exc:
            raise APIError(400, str(exc)) from None
        finally:
            stream.close()

    def _usage(requests: list[EngineRequest], choices: list[_Choice], n: int) -> dict:
        # the n choices of a prompt are consecutive and share it: count each prompt once, as OpenAI does
        firsts = requests[::n]
        prompt_tokens = sum(r.num_prompt_tokens for r in firsts)
        cached = sum(r.num_cached_tokens for r in firsts)
        return protocol.usage(prompt_tokens, sum(c.num_tokens for c in choices), cached)

    async def _stream_events(
        stream: RequestStream,
        requests: list[EngineRequest],
        choices: list[_Choice],
        rid: str,
        created: int,
        body: Any,
        chat: bool,
    ) -> AsyncIterator[str]:
        """SSE events of a streaming completion (chat: deltas after a role chunk; else text pieces)."""
        include_usage = body.include_usage

        def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
            out: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model_name,
                "choices": choice_list,
            }
            if include_usage:
                out["usage"] = usage
            return _event(out)

        try:
            if chat:
                for i in range(len(choices)):
                    role = {"role": "assistant", "content": ""}
                    yield chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
            async for index, out in stream:
                c = choices[index]
                _add(c, out)
                # one chunk per token, even when its text is held back (a partial character or a
                # possible stop-string prefix), so clients can count tokens and time each one
                piece: dict[str, Any] = {"index": index}
                if chat:
                    piece["delta"] = {"content": out.text} if out.text or not out.finish_reason else {}
                else:
                    piece["text"] = out.text
                piece["logprobs"] = c.logprobs.take() if c.logprobs else None
                piece["finish_reason"] = out.finish_reason
                yield chunk([piece])
            if include_usage:
                yield chunk([], _usage(requests, choices, body.n))
            yield "data: [DONE]\n\n"
        except (EngineDeadError, RequestError) as exc:
            yield _event(protocol.error_body(str(exc), "service_unavailable", None, 503))
        finally:
            stream.close()

    return app


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

"""The OpenAI-compatible HTTP app: routes wired to their handlers, authentication and lifespan.

Every request body is read under a size cap, decoded as strict UTF-8 JSON and validated by the
models in protocol.py before anything reaches the engine (intake.py); every failure is an
OpenAI-style error body with a 4xx status, and never touches other requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmbuild.serve import adapters, protocol, status
from llmbuild.serve.api_error import APIError
from llmbuild.serve.async_engine import AsyncEngine
from llmbuild.serve.auth import BearerAuth
from llmbuild.serve.chat import create_chat_completion
from llmbuild.serve.completions import create_completion
from llmbuild.serve.config import ServeConfig
from llmbuild.serve.context import ServeContext, ServerState
from llmbuild.serve.request_log import RequestLogMiddleware, request_record
from llmbuild.serve.tokenize import detokenize, tokenize


def create_app(engine: AsyncEngine, config: ServeConfig, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (whose step loop runs elsewhere); stops the loop on shutdown."""
    ctx = ServeContext.create(engine, config, state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.stop()  # in-flight requests have drained by now (or were cut off at the timeout)

    app = FastAPI(title="llmbuild", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ctx.state
    app.add_middleware(RequestLogMiddleware)
    app.exception_handler(APIError)(_api_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    guarded = [Depends(BearerAuth(config.api_keys))]
    probes = [] if config.public_probes else guarded

    @app.get("/health")
    async def health() -> Response:
        return status.health(ctx)

    @app.get("/ready", dependencies=probes)
    async def ready() -> Response:
        return status.ready(ctx)

    @app.get("/metrics", dependencies=probes)
    async def metrics() -> Response:
        return status.metrics(ctx)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return status.models(ctx)

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model(model_id: str) -> dict:
        return status.model(ctx, model_id)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    @app.post("/v1/load_lora_adapter", dependencies=guarded)
    async def load_lora_adapter_route(request: Request) -> Response:
        return await adapters.load_lora_adapter(ctx, request)

    @app.post("/v1/unload_lora_adapter", dependencies=guarded)
    async def unload_lora_adapter_route(request: Request) -> Response:
        return await adapters.unload_lora_adapter(ctx, request)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize_route(request: Request) -> Response:
        return await tokenize(ctx, request)

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize_route(request: Request) -> Response:
        return await detokenize(ctx, request)

    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    request_record(request).error = exc.kind
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    request_record(request).error = kind
    return JSONResponse(protocol.error_body(str(exc.detail), kind, None, exc.status_code), exc.status_code)

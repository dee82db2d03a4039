"""The server's own state: liveness and readiness probes, Prometheus metrics, the model list."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmbuild.serve.context import ServeContext


def health(ctx: ServeContext) -> Response:
    """Liveness: the process answers and the engine loop runs (no key needed, for probes)."""
    if not ctx.engine.alive:
        return JSONResponse({"status": "engine stopped"}, 503)
    return JSONResponse({"status": "ok"})


def ready(ctx: ServeContext) -> Response:
    """Readiness: the engine is loaded and the server takes new requests."""
    if ctx.state.draining or not ctx.engine.alive:
        return JSONResponse({"status": "draining" if ctx.state.draining else "engine stopped"}, 503)
    return JSONResponse({"status": "ready", "model": ctx.model_name})


def metrics(ctx: ServeContext) -> Response:
    """The engine's Prometheus series in the text exposition format."""
    return Response(generate_latest(ctx.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def models(ctx: ServeContext) -> dict:
    """The OpenAI model list: the one model this server serves."""
    return {
        "object": "list",
        "data": [
            {
                "id": ctx.model_name,
                "object": "model",
                "created": ctx.started,
                "owned_by": "llmbuild",
                "max_model_len": ctx.max_seq_len,
            }
        ],
    }

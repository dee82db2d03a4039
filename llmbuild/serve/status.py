"""The server's own state: liveness and readiness probes, Prometheus metrics, the model list.

Readiness: the port opens only once the engine has loaded (server.py loads it first), so a probe
sees "connection refused" while it loads; from the first SIGTERM on, /ready answers 503 on any
connection still open (uvicorn stops accepting new ones then).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmbuild.serve.context import ServeContext
from llmbuild.serve.intake import check_model


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
    return {"object": "list", "data": [model(ctx, ctx.model_name)]}


def model(ctx: ServeContext, model_id: str) -> dict:
    """The OpenAI model object of `model_id`; a 404 naming the served model for any other id."""
    check_model(ctx, model_id)
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.started,
        "owned_by": "llmbuild",
        "max_model_len": ctx.max_seq_len,
    }

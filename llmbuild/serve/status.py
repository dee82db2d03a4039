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
    """The OpenAI model list: the base model, then each LoRA adapter (its `parent` the base model)."""
    return {"object": "list", "data": [model(ctx, name) for name in (ctx.model_name, *ctx.adapter_names())]}


def model(ctx: ServeContext, model_id: str) -> dict:
    """The OpenAI model object of `model_id` (vLLM's `root` and `parent` included); a 404 naming the served
    models for any other id."""
    check_model(ctx, model_id)
    adapter = ctx.llm.loras.adapters.get(model_id) if ctx.llm.loras is not None else None
    return {
        "id": model_id,
        "object": "model",
        "created": ctx.started,
        "owned_by": "llmbuild",
        "root": str(adapter.path) if adapter is not None else ctx.model_name,
        "parent": ctx.model_name if adapter is not None else None,
        "max_model_len": ctx.max_seq_len,
    }

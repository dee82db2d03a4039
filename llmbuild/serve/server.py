"""serve(): load an engine and run the OpenAI-compatible app under uvicorn until SIGTERM / Ctrl-C.

On the first SIGTERM or SIGINT the server drains: new requests get 503 while in-flight ones run
to completion, for at most `shutdown_timeout` seconds; then the engine loop stops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import FrameType

import uvicorn

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.serve.app import ServerState, create_app
from llmbuild.serve.async_engine import AsyncEngine
from llmbuild.serve.config import ServeConfig
from llmbuild.serve.metrics import Metrics

log = logging.getLogger("llmbuild.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._state.draining:
            log.warning("shutdown signal: draining in-flight requests (new ones get 503)")
        self._state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutting down, so a clean drain would exit -15;
        # a drained server has done its job and exits 0
        getattr(self, "_captured_signals", []).clear()


def build_app(llm: LLMEngine, config: ServeConfig, state: ServerState | None = None):  # -> FastAPI
    """The app for an already loaded engine (the step loop starts with the app's lifespan)."""
    name = config.model_name or llm.engine.manifest.name
    return create_app(AsyncEngine(llm, Metrics(name), config.max_queue), config, state)


def serve(engine_dir: str | Path, config: ServeConfig, backend: str | None = None, log_level: str = "info") -> None:
    """Load the engine at engine_dir and serve it until shut down."""
    llm = LLMEngine.from_dir(engine_dir, backend=backend, enable_prefix_caching=config.enable_prefix_caching)
    state = ServerState()
    app = build_app(llm, config, state)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(config.shutdown_timeout) or None,
        limit_concurrency=None,
        server_header=False,
        proxy_headers=False,
    )
    _DrainingServer(uv_config, state).run()

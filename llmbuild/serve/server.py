"""serve(): load an engine and run the OpenAI-compatible app until SIGTERM / Ctrl-C.

Threads: the engine's step loop runs on the main thread and uvicorn's event loop on a second one.
It must be this way round: torch's OpenMP workers spin briefly between parallel regions only while
the process has no more OpenMP-using threads than cores; a step loop started on a new thread adds
a second thread team, libgomp then throttles the spinning, and every one of the hundreds of
parallel regions per step pays a wake-up (measured here: decode 25% slower at batch 1).

If the step loop fails (a tensor-parallel worker died, say), in-flight requests get the error, the
HTTP server stops and the process exits non-zero, rather than serving errors for ever.

On the first SIGTERM or SIGINT the server drains: new requests get 503 while in-flight ones run
to completion, for at most `shutdown_timeout` seconds; then the step loop stops and the process
exits 0. A second SIGINT cuts the drain short.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from llmbuild.errors import LLMBuildError
from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.lora_manager import register_adapters
from llmbuild.serve.app import create_app
from llmbuild.serve.async_engine import AsyncEngine
from llmbuild.serve.config import ServeConfig
from llmbuild.serve.context import ServerState
from llmbuild.serve.log_format import configure_logging
from llmbuild.serve.metrics import Metrics

log = logging.getLogger("llmbuild.serve")


def serve(
    engine_dir: str | Path,
    config: ServeConfig,
    backend: str | None = None,
    log_level: str = "info",
    speculative: bool | SpeculativeSection = True,
    loras: Sequence[tuple[str, str | Path]] = (),
    draft_engine: str | Path | None = None,
) -> None:
    """Load the engine at engine_dir and serve it until shut down (must run on the main thread).
    `speculative`: LLMEngine's (the engine's own speculative decoding, off, or other settings).
    `loras`: (name, PEFT adapter directory) of each LoRA adapter served as a model of its own.
    `draft_engine`: a draft engine's directory (speculative method draft, see LLMEngine)."""
    configure_logging(config.log_format, log_level)
    llm = LLMEngine.from_dir(
        engine_dir,
        backend=backend,
        enable_prefix_caching=config.enable_prefix_caching,
        speculative=speculative,
        draft_engine=draft_engine,
    )
    try:
        register_adapters(llm.loras, llm.engine.path, loras, config.model_name or llm.engine.manifest.name)
    except BaseException:
        llm.close()
        raise
    # off the start-up path: the port opens while llguidance reads the tokenizer
    threading.Thread(target=_warm_up_grammars, args=(llm,), name="grammar-warm-up", daemon=True).start()
    state = ServerState()
    engine = AsyncEngine(llm, Metrics(config.model_name or llm.engine.manifest.name), config.max_queue)
    app = create_app(engine, config, state)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            log_config=None,  # configure_logging() above: our format for uvicorn's lines too
            access_log=False,  # request_log.py writes one line per request, with its id and tokens
            timeout_graceful_shutdown=int(config.shutdown_timeout) or None,
            server_header=False,
            proxy_headers=False,
        )
    )

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if not state.draining:
            log.warning("shutdown signal: draining in-flight requests (new ones get 503)")
        state.draining = True
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    http = threading.Thread(target=server.run, name="llmbuild-http", daemon=True)
    http.start()
    try:
        engine.run(should_stop=lambda: not http.is_alive())
    except Exception as exc:  # noqa: BLE001 - reported below, after the HTTP server has stopped
        if not isinstance(exc, LLMBuildError):
            log.exception("the engine's step loop failed")
        server.should_exit = True
    finally:
        llm.close()
    http.join(timeout=config.shutdown_timeout + 10)
    if not server.started:
        sys.exit(f"error: could not start the HTTP server on {config.host}:{config.port} (see the log above)")
    if engine.error is not None:
        sys.exit(f"error: the engine stopped after an internal error: {engine.error}")


def _warm_up_grammars(llm: LLMEngine) -> None:
    """Prepare structured output before the first constrained request; a failure only costs that request
    the wait (and its own error, if the tokenizer is one llguidance cannot read)."""
    try:
        llm.grammars.warm_up()
    except Exception as exc:  # noqa: BLE001 - a warm-up must never take the server down
        log.warning("structured output warm-up failed (the first constrained request will retry): %s", exc)

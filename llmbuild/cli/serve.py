"""`llmbuild serve ENGINE`: the OpenAI-compatible HTTP server, configured from flags and the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from llmbuild.cli.console import console
from llmbuild.cli.lora_options import lora_option
from llmbuild.cli.speculative_options import engine_speculation, speculative_options
from llmbuild.serve.config import ServeConfig


def _default(field: str) -> Any:
    """ServeConfig's default for `field`, so that a flag's default is defined once, by the server."""
    return ServeConfig.model_fields[field].default


@click.command("serve")
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--host", help="Address to bind (default: the engine's serve.host, 127.0.0.1).")
@click.option("--port", type=int, help="Port (default: the engine's serve.port, 8000).")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="LLMBUILD_API_KEY",
    help="Accepted bearer token (repeatable; env LLMBUILD_API_KEY). Prefer --api-key-file: argv is visible in ps.",
)
@click.option(
    "--api-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File with one accepted API key per line (# comments and blank lines ignored).",
)
@click.option(
    "--public-probes",
    is_flag=True,
    default=_default("public_probes"),
    help="Let /ready (status and model name) and /metrics (Prometheus series: request counts, latencies, queue, "
    "KV-cache use, model name) answer without an API key, for Kubernetes probes and scrapers. /health never needs "
    "one; every /v1 route, /tokenize and /detokenize still do.",
)
@click.option("--model-name", help="Model id clients send and /v1/models lists (default: the engine name).")
@click.option(
    "--max-queue", type=int, default=_default("max_queue"), show_default=True, help="Waiting requests before 429s."
)
@click.option(
    "--max-body-bytes", type=int, default=_default("max_body_bytes"), show_default=True, help="Largest request body."
)
@click.option("--max-prompt-tokens", type=int, help="Longest prompt accepted (default: max_seq_len - 1).")
@click.option("--max-n", type=int, default=_default("max_n"), show_default=True, help="Largest n (choices per prompt).")
@click.option(
    "--shutdown-timeout",
    type=float,
    default=_default("shutdown_timeout"),
    show_default=True,
    help="Seconds SIGTERM waits for in-flight requests.",
)
@click.option("--no-prefix-caching", is_flag=True, help="Do not reuse KV blocks of repeated prompt prefixes.")
@click.option("--backend", type=click.Choice(["compiled", "eager"]), help="Override the engine's backend.")
@speculative_options
@lora_option
@click.option(
    "--allow-adapter-loading",
    is_flag=True,
    help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read any directory this server can).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=_default("log_format"),
    show_default=True,
    help="Log lines as text or one JSON object per line; either way one line per finished request (id, route, "
    "status, tokens, cached tokens, TTFT, end-to-end time, finish reasons), in place of uvicorn's access log.",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="ed25519 public key (NAME.pub from llmbuild keygen): refuse to serve unless the engine's signature.json "
    "signs its manifest with this key (checked before loading; loading then checks the files against it).",
)
def serve_command(
    engine: Path,
    host: str | None,
    port: int | None,
    api_keys: tuple[str, ...],
    api_key_file: Path | None,
    public_probes: bool,
    model_name: str | None,
    max_queue: int,
    max_body_bytes: int,
    max_prompt_tokens: int | None,
    max_n: int,
    shutdown_timeout: float,
    no_prefix_caching: bool,
    backend: str | None,
    speculative: bool | None,
    num_speculative_tokens: int | None,
    draft_engine: Path | None,
    lora: tuple[tuple[str, Path], ...],
    allow_adapter_loading: bool,
    log_level: str,
    log_format: str,
    public_key: Path | None,
) -> None:
    """Serve ENGINE behind an OpenAI-compatible HTTP API (loopback only unless --host says otherwise)."""
    from llmbuild.manifest import Manifest
    from llmbuild.serve.server import serve as run_server

    keys = list(api_keys)
    if api_key_file is not None:
        keys += _read_api_keys(api_key_file)
    defaults = Manifest.load(engine).serve
    if public_key is not None:
        from llmbuild.signing import verify_engine_signature

        verify_engine_signature(engine, public_key)
    try:
        config = ServeConfig(
            host=host or defaults.host,
            port=defaults.port if port is None else port,
            model_name=model_name,
            api_keys=tuple(keys),
            public_probes=public_probes,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            max_prompt_tokens=max_prompt_tokens,
            max_n=max_n,
            shutdown_timeout=shutdown_timeout,
            enable_prefix_caching=not no_prefix_caching,
            allow_adapter_loading=allow_adapter_loading,
            log_format=log_format,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise click.UsageError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        console(stderr=True).print(
            f"[bold yellow]warning:[/] serving on {config.host} without an API key: anyone who can reach this "
            "port can use the model; pass --api-key-file"
        )
    spec = engine_speculation(engine, speculative, num_speculative_tokens, draft_engine)
    run_server(
        engine, config, backend=backend, log_level=log_level, speculative=spec, loras=lora, draft_engine=draft_engine
    )


def _read_api_keys(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise click.UsageError(f"--api-key-file: cannot read {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise click.UsageError(f"--api-key-file: {path} holds no key (one key per line)")
    return keys

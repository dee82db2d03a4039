"""`llmbuild` command line: parses, calls library functions, prints. Errors are one line."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ByteSize, TypeAdapter, ValidationError

import llmbuild
from llmbuild.errors import LLMBuildError

if TYPE_CHECKING:
    from llmbuild.manifest import Manifest
    from llmbuild.runtime.llm_engine import LLMEngine


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(llmbuild.__version__, prog_name="llmbuild")
def cli(debug: bool) -> None:
    """Ahead-of-time build system for LLM inference: recipe in, engine out, engine served."""


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--memory", help="Memory budget for weights + KV cache, e.g. 16GiB (default: available now).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--target-cpu",
    help="Override the recipe's target.cpu (native, x86-64-v3, x86-64-v4, a gcc -march CPU name).",
)
def plan(recipe: Path, memory: str | None, as_json: bool, target_cpu: str | None) -> None:
    """Validate RECIPE against its checkpoint and print the resolved recipe and memory plan (no build)."""
    from llmbuild.builder.plan import make_plan
    from llmbuild.memory_plan import format_bytes
    from llmbuild.recipe import load_recipe

    r = load_recipe(recipe, target_cpu)
    budget = _parse_bytes(memory, "--memory") if memory else None
    p = make_plan(r, available_bytes=budget)
    m, cfg = p.memory, p.checkpoint.config
    per_seq = m.kv_bytes_per_token * r.limits.max_seq_len
    fit = max(p.available_bytes - m.weight_bytes, 0) // per_seq
    summary = {
        "recipe": r.model_dump(mode="json"),
        "checkpoint": str(p.checkpoint.path),
        "architecture": cfg.architecture,
        "params": cfg.num_params,
        "dtype": p.dtype,
        "kv_cache_dtype": p.kv_cache_dtype,
        "weight_bytes": m.weight_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "kv_bytes_per_sequence": per_seq,
        "kv_cache_bytes": m.kv_budget_bytes,
        "kv_blocks": m.num_blocks,
        "kv_cache_sequences": m.max_full_sequences,
        "memory_budget_bytes": p.available_bytes,
        "sequences_in_budget": fit,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    out = _console()
    out.print(
        f"[bold]{recipe}[/] -> engine [bold]{r.name}[/]: {cfg.architecture}, "
        f"{cfg.num_params / 1e6:.1f}M params, {p.dtype}, {r.target.device}/{r.target.backend}, cpu {r.target.cpu}"
    )
    out.print(r.to_yaml().rstrip(), markup=False)
    out.print()
    rows = [
        ("weights", format_bytes(m.weight_bytes)),
        (
            "KV cache per token",
            f"{format_bytes(m.kv_bytes_per_token)}  ({cfg.num_layers} layers x "
            f"{cfg.num_kv_heads} kv heads x {cfg.head_dim} x K,V in {p.kv_cache_dtype})",
        ),
        ("KV per max-length sequence", f"{format_bytes(per_seq)}  (max_seq_len {r.limits.max_seq_len})"),
        (
            "engine KV cache",
            f"{format_bytes(m.kv_budget_bytes)} = {m.num_blocks} blocks of {m.block_size} tokens "
            f"= {m.max_full_sequences} max-length sequences (max_batch_size {r.limits.max_batch_size})",
        ),
        (
            "memory budget",
            f"{format_bytes(p.available_bytes)}" + ("" if memory else " (available now; --memory)"),
        ),
        ("fits in budget", f"{fit} max-length sequences next to the weights"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.print(f"{k:<{width}}  {v}", markup=False)
    if m.max_full_sequences < r.limits.max_batch_size:
        out.print(
            f"[yellow]note:[/] the KV cache holds fewer max-length sequences ({m.max_full_sequences}) than "
            f"max_batch_size ({r.limits.max_batch_size}); long requests will be preempted"
        )


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Engine directory (default: engines/NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable build summary on stdout.")
@click.option("--no-cache", is_flag=True, help="Run every stage even when the build cache has its output.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    envvar="LLMBUILD_CACHE_DIR",
    help="Build cache directory (default: ~/.cache/llmbuild; env LLMBUILD_CACHE_DIR, also where op libraries go).",
)
@click.option(
    "--target-cpu",
    help="Override the recipe's target.cpu (native, x86-64-v3, x86-64-v4, a gcc -march CPU name).",
)
def compile(
    recipe: Path, output: Path | None, as_json: bool, no_cache: bool, cache_dir: Path | None, target_cpu: str | None
) -> None:
    """Build RECIPE into an engine directory (written atomically; unchanged stages come from the cache)."""
    from llmbuild.builder.build import build_engine
    from llmbuild.recipe import load_recipe

    r = load_recipe(recipe, target_cpu)
    out_dir = output or Path("engines") / r.name
    err = _console(stderr=True)
    status = err.status("starting build")
    status.start()

    def on_stage(name: str, seconds: float | None) -> None:
        if seconds is None:
            status.update(f"[bold]{name}[/] ...")
        else:
            err.print(f"  [green]done[/] {name:<18} {seconds:7.2f} s")

    try:
        result = build_engine(r, out_dir, cache_dir=cache_dir, use_cache=not no_cache, on_stage=on_stage)
    finally:
        status.stop()
    report = result.report
    if as_json:
        click.echo(
            json.dumps(
                {
                    "engine": str(result.engine_dir),
                    "name": result.manifest.name,
                    "config_hash": result.manifest.config_hash,
                    "checkpoint_sha256": result.manifest.inputs.checkpoint_sha256,
                    "stages_seconds": report["stages_seconds"],
                    "total_seconds": report["total_seconds"],
                    "sizes_bytes": report["sizes_bytes"],
                }
            )
        )
    else:
        size = sum(report["sizes_bytes"].values())
        err.print(
            f"engine [bold]{result.engine_dir}[/] built in {report['total_seconds']:.1f} s ({size / 2**20:.1f} MiB)"
        )


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(engine: Path, as_json: bool) -> None:
    """Show ENGINE's manifest: target, model, limits, files, sizes and hashes."""
    from llmbuild.manifest import Manifest
    from llmbuild.runtime.engine import target_mismatch

    manifest = Manifest.load(engine)
    if as_json:
        click.echo(manifest.model_dump_json(indent=1))
        return
    out = _console()
    t, cfg = manifest.target, manifest.model
    mismatch = target_mismatch(manifest)
    out.print(
        f"[bold]{manifest.name}[/]  format v{manifest.format_version}, llmbuild {manifest.llmbuild_version}, "
        f"torch {manifest.torch_version}"
    )
    out.print(
        f"target   {t.device} {t.machine}{' ' + t.arch if t.arch else ''}, backend {t.backend}, tp {t.tensor_parallel}"
    )
    resolved = f" ({t.cpu_resolved})" if t.cpu_resolved != t.cpu else ""
    out.print(
        f"cpu      target.cpu {t.cpu}{resolved}, kernels {t.kernel_isa}"
        + (f", needs {' '.join(t.required_isa)}" if t.required_isa else "")
    )
    out.print("runs here: " + ("[green]yes[/]" if mismatch is None else f"[red]no[/] ({mismatch})"))
    out.print(
        f"model    {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_heads}/{cfg.num_kv_heads} kv, head_dim {cfg.head_dim}, vocab {cfg.vocab_size}, "
        f"{cfg.num_params / 1e6:.1f}M params"
    )
    out.print(
        f"dtype    {manifest.dtype} (KV cache {manifest.kv_cache_dtype}), quantization {manifest.quantization.weights}"
    )
    lim = manifest.limits
    out.print(
        f"limits   max_batch_size {lim.max_batch_size}, max_seq_len {lim.max_seq_len}, "
        f"max_num_tokens {lim.max_num_tokens}, KV block {manifest.kv_cache.block_size}"
    )
    out.print(f"plugins  {', '.join(f'{k} v{v}' for k, v in manifest.plugins.items())}")
    out.print(f"config   {manifest.config_hash[:16]}  checkpoint {manifest.inputs.checkpoint_sha256[:16]}")
    out.print("files")
    for rel, digest in manifest.files.items():
        path = engine / rel
        size = path.stat().st_size if path.is_file() else -1
        out.print(f"  {size:>12,}  {digest[:16]}  {rel}", markup=False)


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--no-smoke", is_flag=True, help="Skip the smoke generation.")
@click.option(
    "--quality",
    is_flag=True,
    help="Re-run the quantization quality check: the engine against its unquantized checkpoint on the "
    "held-out text; fails when the recipe's quality thresholds are missed.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="The checkpoint the engine was built from, for --quality (default: the path in report.json).",
)
def verify(engine: Path, no_smoke: bool, quality: bool, checkpoint: Path | None) -> None:
    """Re-hash every file of ENGINE, check it runs on this machine, smoke-generate and (--quality)
    re-check a quantized engine's quality against its checkpoint."""
    from llmbuild.errors import EngineError
    from llmbuild.manifest import Manifest, verify_files
    from llmbuild.runtime.engine import target_mismatch

    out = _console()
    manifest = Manifest.load(engine)
    verify_files(engine, manifest)
    out.print(f"[green]ok[/] {len(manifest.files)} files match their sha256")
    reason = target_mismatch(manifest)
    if reason:
        raise EngineError(f"{engine}: {reason}")
    out.print(f"[green]ok[/] target {manifest.target.device}/{manifest.target.machine} runs on this machine")
    if not no_smoke:
        _smoke_generate(engine, manifest)
    if quality:
        _verify_quality(engine, checkpoint)


def _smoke_generate(engine: Path, manifest: Manifest) -> None:
    from llmbuild.errors import EngineError
    from llmbuild.runtime.llm_engine import LLMEngine
    from llmbuild.runtime.sampling_params import SamplingParams

    out = _console()
    start = time.perf_counter()
    prompt = [manifest.model.bos_token_id or 0]
    with LLMEngine.from_dir(engine, verify=False) as llm:
        (done,) = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    if len(done.token_ids) != 8:
        raise EngineError(f"{engine}: smoke generation produced {len(done.token_ids)} tokens instead of 8")
    out.print(
        f"[green]ok[/] smoke generation: 8 tokens in {time.perf_counter() - start:.2f} s "
        f"(load included): {done.token_ids}"
    )


def _verify_quality(engine: Path, checkpoint: Path | None) -> None:
    from llmbuild.builder.quality import engine_quality, gate_failures
    from llmbuild.errors import EngineError
    from llmbuild.manifest import REPORT
    from llmbuild.recipe import load_recipe

    out = _console()
    q = engine_quality(engine, checkpoint)
    report = engine / REPORT
    built = json.loads(report.read_text()).get("quality") if report.is_file() else None
    at_build = f" (at build: {built['mean_kl']:.4g}, {built['top1_agreement']:.4f})" if built else ""
    out.print(
        f"quality  mean KL {q.mean_kl:.4g}, top-1 agreement {q.top1_agreement:.4f}{at_build}; perplexity "
        f"{q.perplexity:.2f} vs {q.reference_perplexity:.2f} unquantized, over {q.tokens} held-out tokens"
    )
    failures = gate_failures(load_recipe(engine / "recipe.yaml").quality, q)
    if failures:
        raise EngineError(f"{engine}: quality gate failed: {'; '.join(failures)}")
    out.print("[green]ok[/] quality within the recipe's thresholds")


@cli.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as a JSON list of token ids, e.g. '[5, 17, 42]'.")
@click.option("--chat", is_flag=True, help="Wrap --prompt as a user message in the engine's chat template.")
@click.option("--max-tokens", type=int, help="Most tokens to generate (default: the engine's serve.max_tokens).")
@click.option("--temperature", type=float, help="0 = greedy (default: the engine's serve.temperature).")
@click.option("--top-p", type=float, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (0 = off).")
@click.option(
    "--min-p",
    type=float,
    default=0.0,
    show_default=True,
    help="Drop tokens below min_p x the top probability.",
)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stop-token-id", type=int, multiple=True, help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS.")
@click.option(
    "--output",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one line {token_ids, text, finish_reason}.",
)
@click.option(
    "--backend",
    type=click.Choice(["compiled", "eager"]),
    help="Override the engine's backend (eager runs a compiled engine's exported program, for debugging).",
)
def run(
    engine: Path,
    prompt: str | None,
    prompt_ids: str | None,
    chat: bool,
    output_format: str,
    backend: str | None,
    **sampling: Any,
) -> None:
    """Generate one completion with ENGINE in the terminal."""
    from llmbuild.runtime.llm_engine import LLMEngine

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-ids")
    if chat and prompt is None:
        raise click.UsageError("--chat needs --prompt")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    with LLMEngine.from_dir(engine, backend=backend) as llm:
        _generate(llm, prompt, ids, chat, output_format, sampling)


def _generate(
    llm: LLMEngine, prompt: str | None, ids: list[int] | None, chat: bool, output_format: str, sampling: dict[str, Any]
) -> None:
    """`run`'s generation: sampling defaults from the engine, text streamed to stdout (or one JSON line)."""
    from llmbuild.runtime.sampling_params import SamplingParams

    defaults = llm.engine.manifest.serve
    for key in ("max_tokens", "temperature", "top_p", "top_k"):
        if sampling[key] is None:
            sampling[key] = getattr(defaults, key)
    sampling["stop"] = tuple(sampling["stop"])
    sampling["stop_token_ids"] = tuple(sampling.pop("stop_token_id"))
    params = SamplingParams(**sampling)
    if chat:
        ids = _chat_prompt(llm, prompt or "")
    request = llm.make_request(ids if ids is not None else prompt or "", params)
    text = []
    for out in llm.stream(request):
        text.append(out.text)
        if output_format == "text":
            sys.stdout.write(out.text)
            sys.stdout.flush()
    reason = request.finish_reason.value if request.finish_reason else None
    if output_format == "json":
        click.echo(json.dumps({"token_ids": request.output_token_ids, "text": "".join(text), "finish_reason": reason}))
        return
    sys.stdout.write("\n")
    _console(stderr=True).print(f"[dim]{len(request.output_token_ids)} tokens, finish_reason={reason}[/]")


class _DefaultGroup(click.Group):
    """A group whose `default` subcommand runs when the first argument names no subcommand,
    so `llmbuild bench ENGINE` keeps working beside `llmbuild bench serve`."""

    default = "offline"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_DefaultGroup)
def bench() -> None:
    """Benchmarks: `bench ENGINE` (offline, in-process) or `bench serve --url ...` (a live server)."""


@bench.command("offline")
@click.argument("engine", type=click.Path(path_type=Path))
@click.option(
    "--batch",
    "batches",
    type=int,
    multiple=True,
    default=(1, 16),
    show_default=True,
    help="Static batch sizes to measure (repeatable).",
)
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--compare-eager", is_flag=True, help="Also run the engine's exported program, interleaved.")
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="Replay decode steps as CUDA graphs or not (cuda engines; default: the engine's cuda_graphs.enabled).",
)
@click.option("--threads", type=int, help="torch threads (default: all cores).")
@click.option("--out", type=click.Path(path_type=Path), help="Write OUT.json and OUT.md.")
def bench_offline(
    engine: Path,
    batches: tuple[int, ...],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    compare_eager: bool,
    cuda_graphs: bool | None,
    threads: int | None,
    out: Path | None,
) -> None:
    """Measure ENGINE offline: TTFT, decode tok/s at batch 1 and N, peak RSS, bandwidth ceiling."""
    import torch

    from llmbuild.benchmark import bench_offline as measure
    from llmbuild.benchmark import format_markdown

    if threads:
        torch.set_num_threads(threads)
    report = measure(engine, tuple(batches), prompt_len, new_tokens, repeats, compare_eager, cuda_graphs)
    text = format_markdown(report)
    click.echo(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


@cli.command()
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
@click.option("--model-name", help="Model id clients send and /v1/models lists (default: the engine name).")
@click.option("--max-queue", type=int, default=256, show_default=True, help="Waiting requests before 429s.")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Largest request body.")
@click.option("--max-prompt-tokens", type=int, help="Longest prompt accepted (default: max_seq_len - 1).")
@click.option("--max-n", type=int, default=8, show_default=True, help="Largest n (choices per prompt).")
@click.option(
    "--shutdown-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds SIGTERM waits for in-flight requests.",
)
@click.option("--no-prefix-caching", is_flag=True, help="Do not reuse KV blocks of repeated prompt prefixes.")
@click.option("--backend", type=click.Choice(["compiled", "eager"]), help="Override the engine's backend.")
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def serve(
    engine: Path,
    host: str | None,
    port: int | None,
    api_keys: tuple[str, ...],
    api_key_file: Path | None,
    model_name: str | None,
    max_queue: int,
    max_body_bytes: int,
    max_prompt_tokens: int | None,
    max_n: int,
    shutdown_timeout: float,
    no_prefix_caching: bool,
    backend: str | None,
    log_level: str,
) -> None:
    """Serve ENGINE behind an OpenAI-compatible HTTP API (loopback only unless --host says otherwise)."""
    from llmbuild.manifest import Manifest
    from llmbuild.serve.config import ServeConfig
    from llmbuild.serve.server import serve as run_server

    keys = list(api_keys)
    if api_key_file is not None:
        keys += _read_api_keys(api_key_file)
    defaults = Manifest.load(engine).serve
    try:
        config = ServeConfig(
            host=host or defaults.host,
            port=defaults.port if port is None else port,
            model_name=model_name,
            api_keys=tuple(keys),
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            max_prompt_tokens=max_prompt_tokens,
            max_n=max_n,
            shutdown_timeout=shutdown_timeout,
            enable_prefix_caching=not no_prefix_caching,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise click.UsageError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        _console(stderr=True).print(
            f"[bold yellow]warning:[/] serving on {config.host} without an API key: anyone who can reach this "
            "port can use the model; pass --api-key-file"
        )
    run_server(engine, config, backend=backend, log_level=log_level)


def _read_api_keys(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise click.UsageError(f"--api-key-file: cannot read {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise click.UsageError(f"--api-key-file: {path} holds no key (one key per line)")
    return keys


@bench.command("serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Server base URL.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Clients sending back to back.")
@click.option("--requests", "num_requests", type=int, default=64, show_default=True, help="Requests in all.")
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--api-key", envvar="LLMBUILD_API_KEY", help="Bearer token (env LLMBUILD_API_KEY).")
@click.option("--model", help="Model id (default: the first of /v1/models).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
@click.option("--out", type=click.Path(path_type=Path), help="Write OUT.json and OUT.md.")
def bench_serve(
    url: str,
    concurrency: int,
    num_requests: int,
    prompt_len: int,
    max_tokens: int,
    api_key: str | None,
    model: str | None,
    seed: int,
    out: Path | None,
) -> None:
    """Load a running OpenAI-compatible server: TTFT / TPOT / ITL / e2e percentiles and throughput."""
    import asyncio

    import httpx

    from llmbuild.load_generator import as_json, format_report, run_load

    for name, value in [
        ("--concurrency", concurrency),
        ("--requests", num_requests),
        ("--prompt-len", prompt_len),
        ("--max-tokens", max_tokens),
    ]:
        if value < 1:
            raise click.UsageError(f"{name} must be >= 1 (got {value})")
    try:
        report = asyncio.run(
            run_load(url, concurrency, num_requests, prompt_len, max_tokens, api_key=api_key, model=model, seed=seed)
        )
    except httpx.TransportError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}; is `llmbuild serve` running there?") from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    text = format_report(report)
    click.echo(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(as_json(report))
        out.with_suffix(".md").write_text(text)


def _chat_prompt(llm: Any, prompt: str) -> list[int]:
    from llmbuild.errors import RequestError

    if not getattr(llm.tokenizer, "chat_template", None):
        raise RequestError("this engine's tokenizer has no chat template; drop --chat")
    return list(
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


def _parse_ids(text: str) -> list[int]:
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise click.BadParameter("must be a JSON list of integers, e.g. '[5, 17, 42]'", param_hint="--prompt-ids")
    return ids


def _parse_bytes(text: str, what: str) -> int:
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise click.BadParameter(f"{text!r} is not a size like 16GiB or 8000000000", param_hint=what) from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit codes 1 (error) / 2 (usage) / 130 (interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="llmbuild", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see llmbuild {exc.ctx.command_path.split(' ', 1)[-1]} --help)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except LLMBuildError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no tracebacks without --debug
        if debug:
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(
            f"error: internal error: {type(exc).__name__}: {detail} (rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

"""`llmbuild bench`: `bench ENGINE` measures an engine offline, in-process; `bench serve` loads a live
server. What they measure lives in llmbuild/bench/."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmbuild.cli.speculative_options import engine_speculation, speculative_options


class _DefaultGroup(click.Group):
    """A group whose `default` subcommand runs when the first argument names no subcommand,
    so `llmbuild bench ENGINE` keeps working beside `llmbuild bench serve`."""

    default = "offline"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group("bench", cls=_DefaultGroup)
def bench_group() -> None:
    """Benchmarks: `bench ENGINE` (offline, in-process) or `bench serve --url ...` (a live server)."""


@bench_group.command("offline")
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
    "--backend",
    type=click.Choice(["eager", "compiled"]),
    help="Measure the engine's exported program (eager) or its compiled graph (default: its target.backend).",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="Replay decode steps as CUDA graphs or not (cuda engines; default: the engine's cuda_graphs.enabled).",
)
@speculative_options
@click.option(
    "--compare-speculative", is_flag=True, help="Also run the engine without speculative decoding, interleaved."
)
@click.option(
    "--workload",
    type=click.Choice(["random", "repeat", "text", "grounded"]),
    default="random",
    show_default=True,
    help="Prompts of random tokens; random tokens whose second half repeats the first; held-out English prose; "
    "or prose the answer is to repeat (a passage, then its first tokens again: input-grounded, as summarization).",
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
    backend: str | None,
    cuda_graphs: bool | None,
    speculative: bool | None,
    num_speculative_tokens: int | None,
    draft_engine: Path | None,
    compare_speculative: bool,
    workload: str,
    threads: int | None,
    out: Path | None,
) -> None:
    """Measure ENGINE offline: TTFT, decode tok/s at batch 1 and N, peak RSS, bandwidth ceiling."""
    import torch

    from llmbuild.bench.offline import bench_offline as measure
    from llmbuild.bench.offline import format_markdown

    if threads:
        torch.set_num_threads(threads)
    spec = engine_speculation(engine, speculative, num_speculative_tokens, draft_engine)
    report = measure(
        engine,
        tuple(batches),
        prompt_len,
        new_tokens,
        repeats,
        compare_eager,
        cuda_graphs,
        spec,
        compare_speculative,
        workload,
        draft_engine,
        backend,
    )
    text = format_markdown(report)
    click.echo(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


@bench_group.command("serve")
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

    from llmbuild.bench.load_generator import as_json, format_report, run_load

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

"""`llmbuild plan RECIPE`: the resolved recipe and its memory plan, without building."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ByteSize, TypeAdapter, ValidationError

from llmbuild.cli.console import console

if TYPE_CHECKING:
    from llmbuild.builder.plan import BuildPlan
    from llmbuild.recipe import Recipe


@click.command("plan")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--memory", help="Memory budget for weights + KV cache, e.g. 16GiB (default: available now).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--target-cpu",
    help="Override the recipe's target.cpu (native, x86-64-v3, x86-64-v4, a gcc -march CPU name).",
)
def plan_command(recipe: Path, memory: str | None, as_json: bool, target_cpu: str | None) -> None:
    """Validate RECIPE against its checkpoint and print the resolved recipe and memory plan (no build)."""
    from llmbuild.builder.plan import make_plan
    from llmbuild.recipe import load_recipe

    r = load_recipe(recipe, target_cpu)
    budget = parse_bytes(memory, "--memory") if memory else None
    p = make_plan(r, available_bytes=budget)
    if as_json:
        click.echo(json.dumps(_summary(recipe, r, p), indent=1))
        return
    _print_plan(recipe, r, p, budget_given=bool(memory))


def _sequences_in_budget(r: Recipe, p: BuildPlan) -> int:
    """Max-length sequences whose KV cache fits in the budget next to the weights."""
    per_seq = p.memory.kv_bytes_per_token * r.limits.max_seq_len
    return max(p.available_bytes - p.memory.weight_bytes, 0) // per_seq


def _summary(recipe: Path, r: Recipe, p: BuildPlan) -> dict[str, Any]:
    """`plan --json`: the resolved recipe, the checkpoint and the memory plan in bytes."""
    m, cfg = p.memory, p.checkpoint.config
    return {
        "recipe": r.model_dump(mode="json"),
        "checkpoint": str(p.checkpoint.path),
        "architecture": cfg.architecture,
        "params": cfg.num_params,
        "dtype": p.dtype,
        "kv_cache_dtype": p.kv_cache_dtype,
        "weight_bytes": m.weight_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "kv_bytes_per_sequence": m.kv_bytes_per_token * r.limits.max_seq_len,
        "kv_cache_bytes": m.kv_budget_bytes,
        "kv_blocks": m.num_blocks,
        "kv_cache_sequences": m.max_full_sequences,
        "memory_budget_bytes": p.available_bytes,
        "sequences_in_budget": _sequences_in_budget(r, p),
    }


def _print_plan(recipe: Path, r: Recipe, p: BuildPlan, budget_given: bool) -> None:
    """`plan`'s human-readable form: the recipe as YAML, then one aligned row per memory figure."""
    from llmbuild.memory_plan import format_bytes

    m, cfg = p.memory, p.checkpoint.config
    per_seq = m.kv_bytes_per_token * r.limits.max_seq_len
    out = console()
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
            f"{format_bytes(p.available_bytes)}" + ("" if budget_given else " (available now; --memory)"),
        ),
        ("fits in budget", f"{_sequences_in_budget(r, p)} max-length sequences next to the weights"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.print(f"{k:<{width}}  {v}", markup=False)
    if m.max_full_sequences < r.limits.max_batch_size:
        out.print(
            f"[yellow]note:[/] the KV cache holds fewer max-length sequences ({m.max_full_sequences}) than "
            f"max_batch_size ({r.limits.max_batch_size}); long requests will be preempted"
        )


def parse_bytes(text: str, what: str) -> int:
    """A size like 16GiB or 8000000000 as bytes; a bad one is a usage error naming the option `what`."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise click.BadParameter(f"{text!r} is not a size like 16GiB or 8000000000", param_hint=what) from None

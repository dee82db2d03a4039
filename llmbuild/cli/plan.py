"""`llmbuild plan RECIPE`: the resolved recipe and its memory plan, without building; exits 1 when the
engine does not fit the memory it is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ByteSize, TypeAdapter, ValidationError

from llmbuild.cli.console import console
from llmbuild.memory_plan import format_bytes, largest_step_tokens

if TYPE_CHECKING:
    from llmbuild.builder.plan import BuildPlan
    from llmbuild.recipe import Recipe


@click.command("plan")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--memory",
    help="Host memory a cpu engine must fit (weights, KV cache, activations, overhead), e.g. 16GiB "
    "(default: available now).",
)
@click.option(
    "--gpu-memory",
    help="Memory of the GPU a cuda engine must fit, e.g. 80GiB (default: this machine's GPU); sizes the "
    "recipe without a GPU here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--target-cpu",
    help="Override the recipe's target.cpu (native, x86-64-v3, x86-64-v4, a gcc -march CPU name).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe value by its dotted key, as `compile --set` does (repeatable).",
)
def plan_command(
    recipe: Path,
    memory: str | None,
    gpu_memory: str | None,
    as_json: bool,
    target_cpu: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Validate RECIPE against its checkpoint and print the resolved recipe and memory plan (no build).

    Exits 1 with the shortfall in one line when the engine does not fit --memory (cpu) / --gpu-memory (cuda).
    """
    from llmbuild.builder.plan import make_plan
    from llmbuild.errors import LLMBuildError
    from llmbuild.recipe import load_recipe

    r = load_recipe(recipe, target_cpu, overrides)
    device = r.target.device
    given = gpu_memory if device == "cuda" else memory
    wrong = ("--memory", memory) if device == "cuda" else ("--gpu-memory", gpu_memory)
    if wrong[1] is not None:
        raise click.BadParameter(f"this recipe targets {device}: size it with {_OPTION[device]}", param_hint=wrong[0])
    budget = parse_bytes(given, _OPTION[device]) if given else None
    # sized for another machine's GPU: this one need not have one
    p = make_plan(r, available_bytes=budget, build_machine=not (device == "cuda" and budget is not None))
    shortfall = p.shortfall()
    if as_json:
        click.echo(json.dumps(_summary(recipe, p.recipe, p), indent=1))
    elif shortfall is None:
        _print_plan(recipe, p.recipe, p, budget_given=given is not None)
    if shortfall is not None:
        raise LLMBuildError(shortfall)  # exit 1: a verdict, not a usage error


def _sequences_in_budget(r: Recipe, p: BuildPlan) -> int:
    """Max-length sequences whose KV cache fits in the budget next to the weights."""
    m = p.memory
    per_seq = m.kv_bytes_per_token * p.limits.max_seq_len
    rest = p.available_bytes - m.weight_bytes - m.activation_bytes - m.overhead_bytes - p.draft_bytes
    return max(rest, 0) // per_seq


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
        "lora_slot_bytes": p.lora_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "kv_bytes_per_sequence": m.kv_bytes_per_token * p.limits.max_seq_len,
        "kv_cache_bytes": m.kv_budget_bytes,
        "kv_blocks": m.num_blocks,
        "kv_cache_sequences": m.max_full_sequences,
        "largest_step_tokens": largest_step_tokens(p.limits),
        "activation_bytes": m.activation_bytes,
        "overhead_bytes": m.overhead_bytes,
        "draft": _draft_summary(p.draft) if p.draft is not None else None,
        "required_bytes": p.required_bytes,
        "memory_budget_bytes": p.available_bytes,
        "fits": p.shortfall() is None,
        "sequences_in_budget": _sequences_in_budget(r, p),
    }


def _draft_summary(d: BuildPlan) -> dict[str, Any]:
    """`plan --json`'s `draft`: the built-in draft's checkpoint, weights and KV cache (what required_bytes
    counts of it: draft_bytes)."""
    m = d.memory
    return {
        "name": d.recipe.name,
        "checkpoint": str(d.checkpoint.path),
        "params": d.checkpoint.config.num_params,
        "dtype": d.dtype,
        "kv_cache_dtype": d.kv_cache_dtype,
        "quantization": d.recipe.quantization.model_dump(mode="json"),
        "weight_bytes": m.weight_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "kv_cache_bytes": m.kv_budget_bytes,
        "kv_blocks": m.num_blocks,
        "kv_cache_sequences": m.max_full_sequences,
        "draft_bytes": m.total_bytes,
    }


def _lora_note(r: Recipe, p: BuildPlan) -> str:
    """What the LoRA slots add to the weights (empty without a `lora` section)."""
    if r.lora is None:
        return ""
    return (
        f"  (of which LoRA slots {format_bytes(p.lora_bytes)}: {r.lora.max_loras} adapters of rank <= "
        f"{r.lora.max_rank} on {', '.join(r.lora.target_modules)})"
    )


def _print_plan(recipe: Path, r: Recipe, p: BuildPlan, budget_given: bool) -> None:
    """`plan`'s human-readable form: the recipe as YAML, then one aligned row per memory figure."""
    from llmbuild.builder.plan import memory_breakdown

    m, cfg = p.memory, p.checkpoint.config
    per_seq = m.kv_bytes_per_token * p.limits.max_seq_len
    out = console()
    out.print(
        f"[bold]{recipe}[/] -> engine [bold]{r.name}[/]: {cfg.architecture}, "
        f"{cfg.num_params / 1e6:.1f}M params, {p.dtype}, {r.target.device}/{r.target.backend}, cpu {r.target.cpu}"
    )
    out.print(r.to_yaml().rstrip(), markup=False)
    out.print()
    rows = [
        ("weights", format_bytes(m.weight_bytes) + _lora_note(r, p)),
        (
            "KV cache per token",
            f"{format_bytes(m.kv_bytes_per_token)}  ({cfg.num_layers} layers x "
            f"{cfg.num_kv_heads} kv heads x {cfg.head_dim} x K,V in {p.kv_cache_dtype})",
        ),
        ("KV per max-length sequence", f"{format_bytes(per_seq)}  (max_seq_len {p.limits.max_seq_len})"),
        (
            "engine KV cache",
            f"{format_bytes(m.kv_budget_bytes)} = {m.num_blocks} blocks of {m.block_size} tokens "
            f"= {m.max_full_sequences} max-length sequences (max_batch_size {r.limits.max_batch_size})",
        ),
        (
            "activations",
            f"{format_bytes(m.activation_bytes)}  (largest step: {largest_step_tokens(p.limits)} tokens, "
            "every logit row scored)",
        ),
        ("overhead", f"{format_bytes(m.overhead_bytes)}  ({_OVERHEAD[r.target.device]})"),
        *([("draft engine", _draft_row(p.draft))] if p.draft is not None else []),
        ("engine needs", f"{format_bytes(p.required_bytes)} = {memory_breakdown(p)}"),
        (
            "memory budget",
            format_bytes(p.available_bytes) + ("" if budget_given else f" (available now; {_OPTION[r.target.device]})"),
        ),
        ("fits in budget", f"{_sequences_in_budget(r, p)} max-length sequences next to the weights"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.print(f"{k:<{width}}  {v}", markup=False)
    if m.max_full_sequences < p.limits.max_batch_size:
        out.print(
            f"[yellow]note:[/] the KV cache holds fewer max-length sequences ({m.max_full_sequences}) than "
            f"max_batch_size ({p.limits.max_batch_size}); long requests will be preempted"
        )


def _draft_row(d: BuildPlan) -> str:
    """The built-in draft's line: weights and KV cache, and what it is."""
    m, q = d.memory, d.recipe.quantization
    quantized = f"{q.weights} weights" if q.weights != "none" else f"{d.dtype} weights"
    return (
        f"{format_bytes(m.total_bytes)} = weights {format_bytes(m.weight_bytes)} + KV cache "
        f"{format_bytes(m.total_bytes - m.weight_bytes)} ({m.num_blocks} blocks)  ({d.recipe.name}: "
        f"{d.checkpoint.config.num_params / 1e6:.1f}M params, {quantized}, KV cache {d.kv_cache_dtype})"
    )


_OVERHEAD = {"cpu": "Python, torch, op library, AOTInductor runtime per rank", "cuda": "CUDA context, workspaces"}
_OPTION = {"cpu": "--memory", "cuda": "--gpu-memory"}


def parse_bytes(text: str, what: str) -> int:
    """A size like 16GiB or 8000000000 as bytes; a bad one is a usage error naming the option `what`."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise click.BadParameter(f"{text!r} is not a size like 16GiB or 8000000000", param_hint=what) from None

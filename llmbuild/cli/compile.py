"""`llmbuild compile RECIPE...`: build engine directories, stage by stage, with progress on stderr.

Several recipes build one after another into OUTPUT/NAME and share the build cache; `--json` prints
one summary (a list with several recipes) on stdout and nothing else there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llmbuild.cli.console import console

if TYPE_CHECKING:
    from llmbuild.builder.build import BuildResult
    from llmbuild.recipe import Recipe


@click.command("compile")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RECIPE...")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Engine directory (default: engines/NAME); with several recipes, the directory holding OUTPUT/NAME of each.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe value by its dotted key, validated like the file (repeatable; VALUE is YAML; "
    "applies to every recipe), e.g. --set quantization.weights=int4 --set limits.max_seq_len=512.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable build summary on stdout.")
@click.option("--no-cache", is_flag=True, help="Run every stage even when the build cache has its output.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    envvar="LLMBUILD_CACHE_DIR",
    help="Build cache directory (default: $LLMBUILD_CACHE_DIR, which also holds op libraries, or ~/.cache/llmbuild).",
)
@click.option(
    "--target-cpu",
    help="Override the recipe's target.cpu (native, x86-64-v3, x86-64-v4, a gcc -march CPU name).",
)
def compile_command(
    recipes: tuple[Path, ...],
    output: Path | None,
    overrides: tuple[str, ...],
    as_json: bool,
    no_cache: bool,
    cache_dir: Path | None,
    target_cpu: str | None,
) -> None:
    """Build each RECIPE into an engine directory (written atomically; unchanged stages come from the cache).

    Exit status: 0 built, 1 a build failed, 2 usage (bad arguments, recipe or --set), 3 quality gate failed.
    """
    from llmbuild.builder.build import build_engine
    from llmbuild.cli.build_progress import build_progress
    from llmbuild.recipe import load_recipe

    # every recipe is validated before the first build starts: a typo fails in seconds, not after a build
    loaded = [load_recipe(path, target_cpu, overrides) for path in recipes]
    out_dirs = _engine_dirs(recipes, loaded, output)
    err = console(stderr=True)
    summaries = []
    for path, recipe, out_dir in zip(recipes, loaded, out_dirs, strict=True):
        if len(recipes) > 1:
            err.print(f"building [bold]{path}[/] -> {out_dir}")
        with build_progress(err) as (on_stage, on_progress):
            result = build_engine(
                recipe, out_dir, cache_dir=cache_dir, use_cache=not no_cache, on_stage=on_stage, on_progress=on_progress
            )
        summary = build_summary(path, result)
        summaries.append(summary)
        hits = f", cached: {', '.join(summary['cache_hits'])}" if summary["cache_hits"] else ""
        err.print(
            f"engine [bold]{out_dir}[/] built in {summary['total_seconds']:.1f} s "
            f"({summary['total_bytes'] / 2**20:.1f} MiB{hits})"
        )
    if as_json:
        click.echo(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=1))


def _engine_dirs(paths: tuple[Path, ...], recipes: list[Recipe], output: Path | None) -> list[Path]:
    """Where each engine goes: OUTPUT itself for one recipe, else OUTPUT/NAME (default engines/NAME)."""
    if len(recipes) == 1:
        return [output or Path("engines") / recipes[0].name]
    seen: dict[str, Path] = {}
    for path, recipe in zip(paths, recipes, strict=True):
        if recipe.name in seen:
            raise click.UsageError(
                f"{seen[recipe.name]} and {path} are both named {recipe.name!r}: with several recipes each "
                "engine goes to OUTPUT/NAME; give each recipe its own name"
            )
        seen[recipe.name] = path
    return [(output or Path("engines")) / recipe.name for recipe in recipes]


def build_summary(recipe_path: Path, result: BuildResult) -> dict[str, Any]:
    """`compile --json` for one engine: where it is, its manifest's sha256, sizes, stage timings, cache
    hits, quality metrics and memory plan (from the engine's report.json)."""
    from llmbuild.manifest import MANIFEST

    report, manifest = result.report, result.manifest
    stages = report["stages_seconds"]
    return {
        "engine": str(result.engine_dir),
        "recipe": str(recipe_path),
        "name": manifest.name,
        "manifest_sha256": hashlib.sha256((result.engine_dir / MANIFEST).read_bytes()).hexdigest(),
        "config_hash": manifest.config_hash,
        "checkpoint_sha256": manifest.inputs.checkpoint_sha256,
        "sizes_bytes": report["sizes_bytes"],
        "total_bytes": sum(report["sizes_bytes"].values()),
        "stages_seconds": stages,
        "total_seconds": report["total_seconds"],
        "cache_hits": [name.removesuffix(" (cached)") for name in stages if name.endswith(" (cached)")],
        "quality": report.get("quality"),
        "plan": {
            "dtype": manifest.dtype,
            "kv_cache_dtype": manifest.kv_cache_dtype,
            "limits": manifest.limits.model_dump(mode="json"),
            **report["memory_plan"],
        },
    }

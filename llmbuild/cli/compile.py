"""`llmbuild compile RECIPE`: build an engine directory, stage by stage, with progress on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmbuild.cli.console import console


@click.command("compile")
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
def compile_command(
    recipe: Path, output: Path | None, as_json: bool, no_cache: bool, cache_dir: Path | None, target_cpu: str | None
) -> None:
    """Build RECIPE into an engine directory (written atomically; unchanged stages come from the cache)."""
    from llmbuild.builder.build import build_engine
    from llmbuild.recipe import load_recipe

    r = load_recipe(recipe, target_cpu)
    out_dir = output or Path("engines") / r.name
    err = console(stderr=True)
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

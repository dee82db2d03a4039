"""`llmbuild verify ENGINE`: file hashes, the target check, a smoke generation and (--quality) the
quantization quality gate, re-run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from llmbuild.cli.console import console

if TYPE_CHECKING:
    from llmbuild.manifest import Manifest


@click.command("verify")
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
def verify_command(engine: Path, no_smoke: bool, quality: bool, checkpoint: Path | None) -> None:
    """Re-hash every file of ENGINE, check it runs on this machine, smoke-generate and (--quality)
    re-check a quantized engine's quality against its checkpoint."""
    from llmbuild.errors import EngineError
    from llmbuild.manifest import Manifest, verify_files
    from llmbuild.runtime.engine import target_mismatch

    out = console()
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

    out = console()
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

    out = console()
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

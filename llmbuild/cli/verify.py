"""`llmbuild verify ENGINE|ARCHIVE`: the signature (--public-key), file hashes, the target check, a smoke
generation and (--quality) the quantization quality gate, re-run. An archive (llmbuild pack) is unpacked
into a temporary directory, with unpack's checks, and verified there."""

from __future__ import annotations

import json
import tempfile
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
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="ed25519 public key (NAME.pub from llmbuild keygen): fail unless the engine's signature.json signs "
    "its manifest with this key.",
)
def verify_command(
    engine: Path, no_smoke: bool, quality: bool, checkpoint: Path | None, public_key: Path | None
) -> None:
    """Check ENGINE (a directory, or an archive from llmbuild pack): its signature (--public-key), every
    file's sha256, that it runs on this machine, a smoke generation and (--quality) a quantized engine's
    quality against its checkpoint."""
    if not engine.is_file():
        _verify(engine, engine, no_smoke, quality, checkpoint, public_key)
        return
    from llmbuild.artifact import unpack

    with tempfile.TemporaryDirectory(prefix="llmbuild-verify-") as tmp:
        manifest = unpack(engine, Path(tmp) / "engine")
        console().print(f"[green]ok[/] archive unpacks: {len(manifest.files)} sealed files, no other member")
        _verify(Path(tmp) / "engine", engine, no_smoke, quality, checkpoint, public_key)


def _verify(
    engine: Path, label: Path, no_smoke: bool, quality: bool, checkpoint: Path | None, public_key: Path | None
) -> None:
    """verify_command on an engine directory; `label` is what errors call it (the archive, if any)."""
    from llmbuild.errors import EngineError
    from llmbuild.manifest import Manifest, verify_files
    from llmbuild.runtime.engine import target_mismatch
    from llmbuild.signing import verify_engine_signature

    out = console()
    manifest = Manifest.load(engine)
    if public_key is not None:
        key_id = verify_engine_signature(engine, public_key, where=label)
        out.print(f"[green]ok[/] signature: ed25519 key {key_id[:16]} ({public_key}) signs the manifest")
    verify_files(engine, manifest)
    out.print(f"[green]ok[/] {len(manifest.files)} files match their sha256")
    reason = target_mismatch(manifest)
    if reason:
        raise EngineError(f"{label}: {reason}")
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
    from llmbuild.errors import QualityGateError
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
        raise QualityGateError(f"{engine}: quality gate failed: {'; '.join(failures)}")
    out.print("[green]ok[/] quality within the recipe's thresholds")

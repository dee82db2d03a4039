"""`llmbuild inspect ENGINE`: an engine's manifest, and whether it runs on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import click

from llmbuild.cli.console import console

if TYPE_CHECKING:
    from llmbuild.builder.provenance import Statement
    from llmbuild.manifest import Manifest


@click.command("inspect")
@click.argument("engine", type=click.Path(path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest as JSON (with the provenance under `provenance`)."
)
def inspect_command(engine: Path, as_json: bool) -> None:
    """Show ENGINE's manifest: target, model, limits, files, sizes and hashes."""
    from llmbuild.builder.provenance import load_provenance
    from llmbuild.manifest import Manifest
    from llmbuild.runtime.engine import target_mismatch

    manifest = Manifest.load(engine)
    statement = load_provenance(engine)
    if as_json:
        data = manifest.model_dump(mode="json")
        if statement is not None:
            data["provenance"] = statement.model_dump(mode="json", by_alias=True)
        click.echo(json.dumps(data, indent=1))
        return
    out = console()
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
    q = manifest.quantization
    weights = f"{q.weights} weights + {q.activations} activations (W8A8)" if q.activations != "none" else q.weights
    method = f", method {q.method}" if q.weights != "none" else ""
    out.print(f"dtype    {manifest.dtype} (KV cache {manifest.kv_cache_dtype}), quantization {weights}{method}")
    lim = manifest.limits
    out.print(
        f"limits   max_batch_size {lim.max_batch_size}, max_seq_len {lim.max_seq_len}, "
        f"max_num_tokens {lim.max_num_tokens}, KV block {manifest.kv_cache.block_size}"
    )
    spec = manifest.speculative
    if spec is not None:
        lookup = f", lookup {spec.prompt_lookup_min}-{spec.prompt_lookup_max}" if spec.method == "ngram" else ""
        out.print(
            f"speculative {spec.method}: up to {spec.num_speculative_tokens} tokens{lookup}, at most "
            f"{spec.max_batch_size} decoding sequences" + (", adaptive" if spec.adaptive else "")
        )
    if spec is not None and spec.draft is not None:
        out.print(_draft_line(engine, manifest), markup=False)
    if manifest.lora is not None:
        lora = manifest.lora
        out.print(
            f"lora     {lora.max_loras} slots, rank <= {lora.max_rank}, on {', '.join(lora.target_modules)} "
            "(adapters: run / serve --lora NAME=DIR)"
        )
    out.print(f"plugins  {', '.join(f'{k} v{v}' for k, v in manifest.plugins.items())}")
    out.print(f"config   {manifest.config_hash[:16]}  checkpoint {manifest.inputs.checkpoint_sha256[:16]}")
    for line in _provenance_lines(statement):
        out.print(line, markup=False)
    out.print("files")
    for rel, digest in manifest.files.items():
        path = engine / rel
        size = path.stat().st_size if path.is_file() else -1
        out.print(f"  {size:>12,}  {digest[:16]}  {rel}", markup=False)


def _draft_line(engine: Path, manifest: Manifest) -> str:
    """The built-in draft engine (speculative.draft): its name, model, quantization and size on disk."""
    from llmbuild.errors import EngineError
    from llmbuild.manifest import DRAFT_DIR, Manifest

    files = [rel for rel in manifest.files if rel.startswith(DRAFT_DIR + "/")]
    size = sum((engine / rel).stat().st_size for rel in files if (engine / rel).is_file())
    try:
        draft = Manifest.load(engine / DRAFT_DIR)
    except EngineError as exc:
        return f"draft    unreadable ({exc})"
    q = draft.quantization
    weights = f"{q.weights} weights" if q.weights != "none" else f"{draft.dtype} weights"
    return (
        f"draft    {draft.name} in {DRAFT_DIR}/: {draft.model.num_params / 1e6:.1f}M params, {weights} "
        f"(KV cache {draft.kv_cache_dtype}), {size / 2**20:.1f} MiB in {len(files)} files"
    )


def _provenance_lines(statement: Statement | None) -> list[str]:
    """A summary of provenance.json: the code and tools that built the engine, and the build machine."""
    if statement is None:
        return ["built by  (no provenance.json: built before llmbuild recorded provenance)"]
    code, torch_dep, cxx = (statement.dependency(name) for name in ("llmbuild", "torch", "compiler"))
    digest = (code.digest if code else None) or {}
    source = f"source {digest.get('sha256', '?')[:12]}" + (
        f", git {digest['gitCommit'][:12]}" if "gitCommit" in digest else ""
    )
    tools = [f"llmbuild {statement.predicate.run_details.builder.version.get('llmbuild', '?')} ({source})"]
    if torch_dep and torch_dep.uri:
        tools.append(f"torch {unquote(torch_dep.uri.rpartition('@')[2])}")
    if cxx and cxx.annotations:
        tools.append(cxx.annotations.get("version", "?"))
    machine = statement.predicate.build_definition.internal_parameters.build_machine
    return [
        f"built by {', '.join(tools)}",
        f"built on {machine.cpu_model} ({machine.machine}); provenance.json attests {len(statement.subject)} files",
    ]

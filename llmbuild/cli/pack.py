"""`llmbuild pack ENGINE -o FILE` and `llmbuild unpack FILE -o DIR`: an engine as one deterministic,
optionally signed archive (artifact.py, signing.py), and back."""

from __future__ import annotations

from pathlib import Path

import click

from llmbuild.cli.console import console


@click.command("pack")
@click.argument("engine", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Archive file to write."
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="ed25519 private key (from llmbuild keygen): the archive carries signature.json over the manifest.",
)
@click.option("--compress", is_flag=True, help="gzip the archive (still deterministic: no timestamp, no name).")
def pack_command(engine: Path, output: Path, sign_key: Path | None, compress: bool) -> None:
    """Write ENGINE's manifest and sealed files (not report.json) to one archive with fixed order, times and
    owners: the same engine gives the same bytes."""
    from llmbuild.artifact import pack
    from llmbuild.manifest import MANIFEST, SIGNATURE

    members = pack(engine, output, sign_key=sign_key, compress=compress)
    metadata = [name for name in (MANIFEST, SIGNATURE) if name in members]
    console().print(
        f"[green]packed[/] {' + '.join(metadata)} + {len(members) - len(metadata)} sealed files -> {output} "
        f"({output.stat().st_size:,} bytes)" + (", signed" if SIGNATURE in members else ", unsigned")
    )


@click.command("unpack")
@click.argument("archive", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Engine directory to create (must not exist, or be empty).",
)
def unpack_command(archive: Path, output: Path) -> None:
    """Restore the engine in ARCHIVE to a new directory, refusing unsafe paths, links, files the manifest
    does not list and files that do not match its sha256 (nothing is written then)."""
    from llmbuild.artifact import unpack

    manifest = unpack(archive, output)
    console().print(f"[green]unpacked[/] {manifest.name}: {len(manifest.files)} files match their sha256 -> {output}")

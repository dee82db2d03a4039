"""`llmbuild keygen -o NAME`: an ed25519 key pair for signing engine archives (signing.py)."""

from __future__ import annotations

from pathlib import Path

import click

from llmbuild.cli.console import console


@click.command("keygen")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Private key file to write (mode 0600); the public key goes to NAME.pub.",
)
def keygen_command(output: Path) -> None:
    """Write a new ed25519 signing key NAME and its public key NAME.pub; never overwrites either."""
    from llmbuild.signing import generate_key, public_key_path

    key_id = generate_key(output)
    console().print(
        f"[green]wrote[/] private key {output} (keep it secret) and public key {public_key_path(output)}; "
        f"key id {key_id[:16]}"
    )

"""Writing an engine directory atomically: everything goes to a hidden sibling directory that is
renamed into place only when complete, so an interrupted or failed build leaves no half-written engine."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmbuild.errors import BuildError
from llmbuild.manifest import MANIFEST


def check_output_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that is not an llmbuild engine."""
    if out_dir.exists() and not (out_dir.is_dir() and (out_dir / MANIFEST).is_file()):
        if out_dir.is_file() or any(out_dir.iterdir()):
            raise BuildError(f"output {out_dir} exists and is not an llmbuild engine; choose another -o or remove it")


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory next to out_dir; on success swap it into place, else delete it.

    The swap renames an existing engine aside first, so readers see either the old or the new engine.
    """
    out_dir = out_dir.resolve()
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        yield stage
        os.chmod(stage, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "engine")
            os.rename(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)

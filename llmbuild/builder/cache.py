"""The build cache: outputs of expensive stages, keyed by exactly what they depend on.

    <cache>/builds/graph/<config hash>/model.pt2                 export + AOTInductor compile
    <cache>/builds/weights/<weights key>/weights.safetensors     checkpoint -> engine dtype

The compiled graph never depends on weight values (they stay outside the .so), so a new checkpoint
of the same architecture reuses it; the weights never depend on the target, so a new target reuses
them. Entries are written atomically and never modified; delete the directory to reclaim space.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class BuildCache:
    def __init__(self, root: Path, read: bool = True) -> None:
        self.root = root / "builds"
        self.read = read
        """False (--no-cache): every stage runs; its outputs still refresh the cache."""

    def lookup(self, kind: str, key: str, name: str) -> Path | None:
        """The cached file, or None when absent or reading is disabled."""
        path = self.root / kind / key / name
        return path if self.read and path.is_file() else None

    def store(self, kind: str, key: str, src: Path) -> None:
        """Copy src into the cache under (kind, key), atomically."""
        final = self.root / kind / key
        if (final / src.name).is_file():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            shutil.copyfile(src, tmp / src.name)
            try:
                os.rename(tmp, final)
            except OSError:  # another build stored it first (or a stale entry); keep theirs
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

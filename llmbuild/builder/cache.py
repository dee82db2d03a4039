"""The build cache: outputs of expensive stages, keyed by exactly what they depend on.

    <cache>/builds/graph/<config hash>/{model,exported}.pt2      export + AOTInductor compile
    <cache>/builds/weights/<weights key>/rank<r>.safetensors     checkpoint -> engine dtype, per rank

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

    def store(self, kind: str, key: str, src: Path, name: str | None = None) -> None:
        """Copy src into the cache under (kind, key) as `name` (default: its own name), atomically."""
        name = name or src.name
        target = self.root / kind / key / name
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)  # readers see the whole file or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

"""Build (once) and load the C++ op library.

The library is compiled with -march=native on the machine that runs it and cached under
`<cache>/plugins/<key>/`, where the key hashes the sources, compiler flags, torch version and
this CPU's instruction-set flags; a later process only loads the cached .so.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from pathlib import Path

import torch

from llmbuild.errors import LLMBuildError
from llmbuild.machine import native_isa

CSRC = Path(__file__).parent / "csrc"
NAME = "llmbuild_ops"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-Wall")
LDFLAGS = ("-fopenmp",)

_loaded: Path | None = None


def default_cache_dir() -> Path:
    """$LLMBUILD_CACHE_DIR, else $XDG_CACHE_HOME/llmbuild, else ~/.cache/llmbuild."""
    if os.environ.get("LLMBUILD_CACHE_DIR"):
        return Path(os.environ["LLMBUILD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmbuild"


def sources() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def library_key() -> str:
    """Hash of everything the built .so depends on."""
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(platform.machine().encode())
    h.update(" ".join(native_isa()).encode())
    return h.hexdigest()[:24]


def load_library(cache_dir: Path | None = None) -> Path:
    """Load the op library into this process, building it first if this machine has no cached build."""
    global _loaded
    if _loaded is not None:
        return _loaded
    build_dir = (cache_dir or default_cache_dir()) / "plugins" / library_key()
    so = build_dir / f"{NAME}.so"
    if so.is_file():
        torch.ops.load_library(str(so))
    else:
        _build(build_dir)
    _loaded = so
    return so


def _build(build_dir: Path) -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise LLMBuildError(
            f"building the llmbuild op library needs a C++ compiler ({compiler!r} not found); "
            "install one (e.g. apt-get install g++) or set CXX"
        )
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        # builds build_dir/NAME.so with ninja (under a file lock) and loads it
        load(
            NAME,
            [str(p) for p in sources() if p.suffix == ".cpp"],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError) as exc:
        lines = str(exc).strip().splitlines()
        first_error = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
        raise LLMBuildError(
            f"building the llmbuild op library in {build_dir} failed: {first_error.strip()} "
            "(rerun with --debug for the whole compiler output)"
        ) from exc

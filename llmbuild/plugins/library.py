"""Build and load the C++ op library.

The builder compiles the library for an engine's CPU target (`-march=<target.cpu>`, isa.h's kernel
tiers that target allows) and seals the .so into the engine; the runtime loads it from there, so a
serving machine needs no compiler. Builds are cached under `<cache>/plugins/<key>/`, where the key hashes
the sources, flags, torch version and the resolved target.

One op library serves a process: the `llmbuild` op namespace can be registered once. The first library
loaded stays; a later engine's copy (same op versions, checked by the runtime) is not loaded again, and
its ops run at the loaded library's best tier unless `use_isa` lowers it. A serving process loads one
engine, so it runs that engine's own library.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch.utils import cpp_extension

from llmbuild.cpu_target import CpuTarget, compiler
from llmbuild.errors import LLMBuildError

CSRC = Path(__file__).parent / "csrc"
NAME = "llmbuild_ops"
FILE = f"{NAME}.so"
# -fopenmp: at::parallel_for is inline OpenMP; the library links the libgomp torch already loaded
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c++20", "-Wall", "-fvisibility-inlines-hidden")
LDFLAGS = ("-shared", "-fopenmp")

ISAS: dict[str, frozenset[str]] = {
    "avx512": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "portable": frozenset(),
}
"""Kernel tiers (csrc/isa.h), best first, with the /proc/cpuinfo flags each needs. Within a tier an op
may use more (the AVX-512 int8/int4 decode needs avx512_vnni, the bf16 GEMV avx512_bf16) where the
target has them, and otherwise takes its next tier's path."""

_loaded: Path | None = None


def default_cache_dir() -> Path:
    """$LLMBUILD_CACHE_DIR, else $XDG_CACHE_HOME/llmbuild, else ~/.cache/llmbuild."""
    if os.environ.get("LLMBUILD_CACHE_DIR"):
        return Path(os.environ["LLMBUILD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmbuild"


def sources() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def read_sources() -> dict[str, bytes]:
    """The sources' bytes by file name: the library is keyed by and compiled from this one reading, so an
    edit made during a build cannot land under the previous sources' key."""
    return {p.name: p.read_bytes() for p in sources()}


@cache
def compiler_identity(cxx: str) -> str:
    """What `cxx --version` says (a compiler upgrade must not reuse libraries the old one built)."""
    path = shutil.which(cxx)
    if path is None:
        return cxx
    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    return f"{path}\n{proc.stdout.strip()}"


def target_isa(features: tuple[str, ...] | frozenset[str]) -> str:
    """The best kernel tier code compiled for (or a CPU with) these features holds."""
    return next(name for name, needs in ISAS.items() if needs <= set(features))


def library_key(target: CpuTarget, source_bytes: dict[str, bytes] | None = None) -> str:
    """Hash of everything the built .so depends on: sources, the compile and link commands (flags, header
    and library paths), compiler, torch and the target."""
    h = hashlib.sha256()
    for name, data in sorted((source_bytes or read_sources()).items()):
        h.update(name.encode())
        h.update(data)
    h.update("\0".join(compile_flags(target) + LDFLAGS + link_libraries()).encode())
    h.update(compiler_identity(compiler()).encode())
    h.update(torch.__version__.encode())
    h.update(platform.machine().encode())
    h.update(f"{target.name} {target.resolved} {' '.join(target.features)}".encode())
    return h.hexdigest()[:24]


def compile_flags(target: CpuTarget) -> tuple[str, ...]:
    """The compiler's flags for `target`, less the build directory's own path map."""
    headers = cpp_extension.include_paths()
    return (
        *CFLAGS,
        f"-march={target.march}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # torch's headers name their files in assertion messages: where torch is installed (this venv, a
        # CI checkout's) must not change the library's bytes
        f"-ffile-prefix-map={Path(headers[0]).parent}=torch",
        *(f"-I{p}" for p in headers),
    )


def link_libraries() -> tuple[str, ...]:
    return (*(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch")


def build_library(target: CpuTarget, cache_dir: Path | None = None, reuse: bool = True) -> Path:
    """The op library compiled for `target`: from the cache (unless `reuse` is False), else compiled into
    it. Loads nothing."""
    _check_compiler()
    source_bytes = read_sources()
    build_dir = (cache_dir or default_cache_dir()) / "plugins" / library_key(target, source_bytes)
    so = build_dir / FILE
    if reuse and so.is_file():
        return so
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if not (reuse and so.is_file()):
            _compile(target, source_bytes, so)
    return so


def load_library(path: Path) -> Path:
    """Load an op library into this process; returns the one that serves it (the first loaded)."""
    global _loaded
    if _loaded is None:
        torch.ops.load_library(str(path))
        _loaded = path
    return _loaded


def loaded_library() -> Path | None:
    """The op library this process runs, if one is loaded."""
    return _loaded


def compiled_isas() -> tuple[str, ...]:
    """The kernel tiers of the loaded library, best first."""
    return tuple(torch.ops.llmbuild_isa.compiled())


@contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the ops at kernel tier `name` (or their best path below it) inside the block."""
    best = compiled_isas()[0]
    torch.ops.llmbuild_isa.use(name)
    try:
        yield
    finally:
        torch.ops.llmbuild_isa.use(best)


def _check_compiler() -> None:
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise LLMBuildError(
            f"building the llmbuild op library needs a C++ compiler ({cxx!r} not found); "
            "install one (e.g. apt-get install g++) or set CXX"
        )


def _compile(target: CpuTarget, source_bytes: dict[str, bytes], so: Path) -> None:
    cxx = compiler()
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        src = Path(tmp) / "csrc"
        src.mkdir()
        for name, data in source_bytes.items():
            (src / name).write_bytes(data)
        # the build's location must not end up in the engine's bytes (assertion messages name files)
        flags = [*compile_flags(target), f"-ffile-prefix-map={src}=llmbuild/plugins/csrc"]
        units = sorted(src / name for name in source_bytes if name.endswith(".cpp"))
        objects = [str(Path(tmp) / f"{p.stem}.o") for p in units]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda u, o: _run([cxx, *flags, "-c", str(u), "-o", o], target), units, objects))
        _run([cxx, *LDFLAGS, *objects, "-o", str(Path(tmp) / FILE), *link_libraries()], target)
        os.replace(Path(tmp) / FILE, so)


def _run(cmd: list[str], target: CpuTarget) -> None:
    """Run a compiler command; a failure raises with the compiler's first error line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[-1] if lines else f"exit {proc.returncode}")
        raise LLMBuildError(
            f"building the llmbuild op library for -march={target.march} failed: {first.strip()} "
            "(rerun with --debug for the whole compiler output)"
        ) from RuntimeError(proc.stderr)

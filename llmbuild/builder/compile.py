"""AOTInductor: compile an exported step graph into a package for the build machine's CPU.

Weights stay out of the shared library (`package_constants_in_so=False`): the package holds code
only, and the runtime hands it the engine's weights with `load_constants(..., user_managed=True)`.
Because the code does not depend on weight values, one compiled package serves every checkpoint
of the same architecture, dtype and limits (the build cache relies on this).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,
}
_TRAILER = b"\n// Compile cmd\n"


def compile_graph(program: ExportedProgram, path: Path, inductor_dir: Path, tp: int = 1) -> None:
    """Compile `program` with AOTInductor into the package file `path` (a .pt2 archive).

    `inductor_dir` is Inductor's working cache; its path ends up in the package (source comments,
    kernel names, debug info), so a fixed directory is what makes the bytes reproducible.
    A tensor-parallel graph (tp > 1) is compiled against a stand-in process group of tp ranks.
    """
    with torch.no_grad(), warnings.catch_warnings(), temporary_cache_dir(str(inductor_dir)), _stand_in_group(tp):
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # torch-internal
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=INDUCTOR_CONFIGS)
    _normalize(path)


@contextmanager
def _stand_in_group(tp: int) -> Iterator[None]:
    """A process group that only pretends to communicate, for the duration of a compile.

    Inductor looks the all-reduces' group up by name while compiling (for its size); the real
    group exists only at run time, in the runtime's worker processes.
    """
    if tp == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=tp)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _normalize(path: Path) -> None:
    """Rewrite the package so that equal code gives equal bytes.

    Inductor appends its compile and link commands to the packaged C++ sources on a fresh compile
    but not on a cache hit; the sources are kept for reference only (the .so is what runs), so the
    trailer is cut. The archive's serialization id is a hash of the records, so it follows suit.
    """
    reader = PT2ArchiveReader(str(path))
    records = {name: reader.read_bytes(name) for name in reader.get_file_names()}
    del reader
    for name, data in records.items():
        if name.endswith(".cpp") and _TRAILER in data:
            records[name] = data[: data.index(_TRAILER)] + b"\n"
    tmp = path.with_suffix(".normalizing")
    with PT2ArchiveWriter(str(tmp)) as writer:
        for name, data in records.items():
            if not name.startswith(".data/"):
                writer.write_bytes(name, data)
    os.replace(tmp, path)

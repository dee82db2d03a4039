"""AOTInductor: compile an exported step graph into a package for the target CPU (`target.cpu`).

Weights stay out of the shared library (`package_constants_in_so=False`): the package holds code
only, and the runtime hands it the engine's weights with `load_constants(..., user_managed=True)`.
Because the code does not depend on weight values, one compiled package serves every checkpoint
of the same architecture, dtype and limits (the build cache relies on this).

Inductor compiles its C++ with `-march=native` and vectorizes for the best ISA of the machine it runs
on. For any other target it gets `-march=<target.cpu>` and a vector ISA the target has too (AVX-512 only
where the target has it, VNNI only where the target has it): a package built on an AVX-512 machine for
x86-64-v3 holds no AVX-512 instruction.

Inductor records the path of its working directory in the package (a source comment whose hash names
the kernel file, debug info in the .so), so every build compiles in one fixed directory of this user
(`inductor_dir()`), never under the build cache: builds with other `--cache-dir` values and outputs give
the same bytes.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch._inductor import cpu_vec_isa
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

from llmbuild.cpu_target import CpuTarget
from llmbuild.errors import BuildError

INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,
    # Inductor otherwise bakes 0-d tensors and 1-D tensors of up to 8 values (an fp8 per-tensor weight
    # scale, a bias of a few outputs) into the code as literals: the package would compute with the
    # values of the checkpoint it was compiled from, whatever weights it is handed
    "always_keep_tensor_constants": True,
}
_TRAILER = b"\n// Compile cmd\n"


# Inductor's vector ISAs (cpu_vec_isa.VecISA names) and the /proc/cpuinfo flags their compiler flags enable
_VEC_ISA_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"},
    "avx512_vnni": {"avx512_vnni"},
    "amx_tile": {"amx_tile", "amx_bf16", "amx_int8"},
}


def compile_graph(program: ExportedProgram, path: Path, cpu: CpuTarget, tp: int = 1) -> None:
    """Compile `program` with AOTInductor for `cpu` into the package file `path` (a .pt2 archive).

    A tensor-parallel graph (tp > 1) is compiled against a stand-in process group of tp ranks.
    """
    configs = {**INDUCTOR_CONFIGS, **_cpu_configs(cpu)}
    with torch.no_grad(), warnings.catch_warnings(), temporary_cache_dir(str(inductor_dir())), _stand_in_group(tp):
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # torch-internal
        with _vector_isas_of(cpu):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    _normalize(path)


def inductor_dir() -> Path:
    """Inductor's working directory: `<tmp>/llmbuild-inductor-<uid>`, private to this user.

    Its path ends up in the package, so it must not vary from build to build (Inductor's entries are
    keyed by content, so builds share it safely). Code compiled there is loaded into the build: a
    directory another user owns or can write to is refused.
    """
    path = Path(tempfile.gettempdir()) / f"llmbuild-inductor-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildError(
            f"Inductor's working directory {path} is not a directory private to this user; remove it and rebuild"
        )
    return path


def _cpu_configs(cpu: CpuTarget) -> dict[str, object]:
    """Inductor's -march and vector width for `cpu` (its defaults for native)."""
    if cpu.name == "native":
        return {}
    features = set(cpu.features)
    width = 512 if _VEC_ISA_FLAGS["avx512"] <= features else 256 if _VEC_ISA_FLAGS["avx2"] <= features else 1
    # width 1 matches no vector ISA: scalar C++, which the compiler vectorizes for -march as it can
    return {"cpp.march": cpu.march, "cpp.simdlen": width}


@contextmanager
def _vector_isas_of(cpu: CpuTarget) -> Iterator[None]:
    """Keep Inductor to the vector ISAs that both this machine and `cpu` have.

    NOTE: Inductor picks the first ISA of `valid_vec_isa_list()` with the configured width, and lists
    AVX512-VNNI before plain AVX-512; it has no setting to leave out VNNI for an AVX-512 target without
    it (x86-64-v4), so the list is filtered for the duration of the compile (torch 2.13's private API).
    """
    if cpu.name == "native":
        yield
        return
    features = set(cpu.features)
    every = cpu_vec_isa.valid_vec_isa_list()
    kept = [isa for isa in every if all(_VEC_ISA_FLAGS.get(part, {part}) <= features for part in str(isa).split())]
    with mock.patch.object(cpu_vec_isa, "valid_vec_isa_list", lambda: kept):
        yield


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

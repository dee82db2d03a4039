"""The CPU an engine is compiled for (`target.cpu`): resolved by the build machine's compiler, checked by
the runtime against the CPU it runs on.

A target is a gcc/clang `-march` value: `native` (the build machine's CPU), an x86-64 micro-architecture
level (`x86-64-v3`: AVX2, FMA, F16C; `x86-64-v4`: AVX-512 F/BW/CD/DQ/VL) or a CPU name (`haswell`,
`znver4`, `sapphirerapids`, ...). Its features are what the compiler enables for it, read off the
macros it predefines (`c++ -march=X -dM -E`), named as /proc/cpuinfo names them, so that a machine
without a compiler can tell whether it can run the engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache

from llmbuild.errors import BuildError

# Predefined macro -> /proc/cpuinfo flag, for every extension compiled code may use.
_MACRO_FLAGS = {
    "__SSE3__": "pni",
    "__SSSE3__": "ssse3",
    "__SSE4_1__": "sse4_1",
    "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt",
    "__AVX__": "avx",
    "__AVX2__": "avx2",
    "__FMA__": "fma",
    "__F16C__": "f16c",
    "__BMI__": "bmi1",
    "__BMI2__": "bmi2",
    "__LZCNT__": "abm",
    "__MOVBE__": "movbe",
    "__AVX512F__": "avx512f",
    "__AVX512BW__": "avx512bw",
    "__AVX512CD__": "avx512cd",
    "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl",
    "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16",
    "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512IFMA__": "avx512ifma",
    "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVXVNNI__": "avx_vnni",
    "__AMX_TILE__": "amx_tile",
    "__AMX_BF16__": "amx_bf16",
    "__AMX_INT8__": "amx_int8",
    "__GFNI__": "gfni",
    "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq",
    "__AES__": "aes",
    "__PCLMUL__": "pclmulqdq",
    "__SHA__": "sha_ni",
    "__ADX__": "adx",
    # aarch64 (/proc/cpuinfo "Features")
    "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
    "__ARM_FEATURE_DOTPROD": "asimddp",
    "__ARM_FEATURE_MATMUL_INT8": "i8mm",
    "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16",
    "__ARM_FEATURE_SVE": "sve",
    "__ARM_FEATURE_SVE2": "sve2",
}

# The x86-64 micro-architecture levels (psABI), best first, as /proc/cpuinfo flags: what the runtime
# suggests to a machine that cannot run an engine.
X86_64_LEVELS: dict[str, frozenset[str]] = {}
_v2 = frozenset({"pni", "ssse3", "sse4_1", "sse4_2", "popcnt"})
_v3 = _v2 | {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"}
_v4 = _v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
X86_64_LEVELS.update({"x86-64-v4": _v4, "x86-64-v3": _v3, "x86-64-v2": _v2, "x86-64": frozenset()})

_NAME = re.compile(r"^[a-z0-9][a-z0-9.+_-]*$")


@dataclass(frozen=True)
class CpuTarget:
    """A resolved `target.cpu`."""

    name: str
    """The recipe's value: `native`, `x86-64-v3`, a CPU name."""
    resolved: str
    """What the compiler resolves it to: the build CPU's name for `native` (e.g. znver3), else the name."""
    features: tuple[str, ...]
    """Instruction-set extensions code compiled for it may use, as /proc/cpuinfo names them (sorted)."""

    @property
    def march(self) -> str:
        """The compiler's -march value."""
        return self.name

    def missing_on(self, cpu_flags: frozenset[str]) -> list[str]:
        """The target's features a CPU with these flags lacks (sorted; empty: it can run the code)."""
        return sorted(set(self.features) - cpu_flags)


def check_name(name: str) -> str:
    """`name` if it is well-formed for -march, else ValueError (the recipe's check)."""
    if not _NAME.match(name):
        raise ValueError(
            f"must be native, an x86-64 level (x86-64-v3, x86-64-v4) or a gcc -march CPU name (got {name!r})"
        )
    return name


def compiler() -> str:
    """The C++ compiler the build uses: $CXX, else c++."""
    return os.environ.get("CXX") or "c++"


@cache
def resolve(name: str) -> CpuTarget:
    """Ask the build machine's C++ compiler what `-march=name` enables. Needs a compiler."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise BuildError(
            f"target.cpu: resolving '{name}' needs a C++ compiler ({cxx!r} not found); install one "
            "(e.g. apt-get install g++) or set CXX"
        )
    cmd = [cxx, f"-march={name}", "-dM", "-E", "-x", "c++", os.devnull]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip())
        raise BuildError(
            f"target.cpu: '{name}' is not a CPU the compiler knows ({detail.strip()}); use native, "
            "x86-64-v3, x86-64-v4 or a gcc -march name such as haswell or znver4"
        )
    macros = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("#define ")}
    features = tuple(sorted({flag for macro, flag in _MACRO_FLAGS.items() if macro in macros}))
    return CpuTarget(name=name, resolved=_native_name(cxx) if name == "native" else name, features=features)


def _native_name(cxx: str) -> str:
    """The CPU name the compiler picks for -march=native (gcc: -Q --help=target), else 'native'."""
    proc = subprocess.run([cxx, "-march=native", "-Q", "--help=target"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "-march=":
            return parts[1]
    return "native"


def known_flags() -> frozenset[str]:
    """Every /proc/cpuinfo flag a target can require."""
    return frozenset(_MACRO_FLAGS.values())


def fitting_level(cpu_flags: frozenset[str]) -> str:
    """The best x86-64 level a CPU with these flags runs."""
    return next(level for level, needs in X86_64_LEVELS.items() if needs <= cpu_flags)

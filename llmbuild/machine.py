"""Facts about this machine that engines and the op library depend on."""

from __future__ import annotations

from functools import cache

import torch

# cpuinfo flags a compiler may use under -march=native (what a compiled engine can require)
_ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "bmi", "sse4", "ssse3", "popcnt", "movbe", "vaes", "vpclmul", "gfni")


@cache
def cpu_flags() -> frozenset[str]:
    """Instruction-set flags of this CPU (/proc/cpuinfo), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_isa() -> tuple[str, ...]:
    """The vector/bit-manipulation extensions code built with -march=native here may use."""
    return tuple(sorted(f for f in cpu_flags() if f.startswith(_ISA_PREFIXES)))


def gpu_arch() -> str | None:
    """The architecture of this machine's first GPU (sm_90 for an H100), None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"

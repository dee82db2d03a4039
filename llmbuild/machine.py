"""Facts about this machine that engines and the op library depend on."""

from __future__ import annotations

import platform
from functools import cache

import torch


@cache
def cpu_flags() -> frozenset[str]:
    """Instruction-set flags of this CPU (/proc/cpuinfo "flags" on x86, "Features" on ARM), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gpu_arch() -> str | None:
    """The architecture of this machine's first GPU (sm_90 for an H100), None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"

"""How much memory an engine needs, and how many sequences its KV cache holds.

Shared by `llmbuild plan` (before a build) and the runtime (when it allocates the cache), so that
the numbers a user plans with are the numbers the server uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from llmbuild.errors import LLMBuildError
from llmbuild.recipe import KVCacheSection, LimitsSection


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Weights and KV-cache sizing of an engine: all its ranks together (they share this machine)."""

    weight_bytes: int
    kv_bytes_per_token: int
    block_size: int
    max_seq_len: int
    max_batch_size: int
    kv_budget_bytes: int

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def blocks_per_sequence(self) -> int:
        """Blocks one max_seq_len sequence occupies."""
        return math.ceil(self.max_seq_len / self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.kv_budget_bytes // self.kv_bytes_per_block

    @property
    def max_full_sequences(self) -> int:
        """How many max_seq_len sequences fit in the KV cache at once."""
        return self.num_blocks // self.blocks_per_sequence

    @cached_property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.num_blocks * self.kv_bytes_per_block

    def as_report(self) -> dict[str, int]:
        """The plan as an engine's report.json records it."""
        return {
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_blocks": self.num_blocks,
            "blocks_per_sequence": self.blocks_per_sequence,
            "max_full_sequences": self.max_full_sequences,
        }


def plan_memory(
    *,
    weight_bytes: int,
    kv_bytes_per_token: int,
    limits: LimitsSection,
    kv_cache: KVCacheSection,
    available_bytes: int | None,
) -> MemoryPlan:
    """Size the KV cache: explicit bytes, a fraction of what is available after weights, or (default)
    exactly room for max_batch_size sequences of max_seq_len tokens."""
    blocks_per_seq = math.ceil(limits.max_seq_len / kv_cache.block_size)
    block_bytes = kv_bytes_per_token * kv_cache.block_size
    if kv_cache.memory_bytes is not None:
        budget = int(kv_cache.memory_bytes)
    elif kv_cache.memory_fraction is not None:
        if available_bytes is None:
            raise LLMBuildError("kv_cache.memory_fraction needs the available memory; pass --memory")
        budget = int(max(available_bytes - weight_bytes, 0) * kv_cache.memory_fraction)
    else:
        budget = limits.max_batch_size * blocks_per_seq * block_bytes
    return MemoryPlan(
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        block_size=kv_cache.block_size,
        max_seq_len=limits.max_seq_len,
        max_batch_size=limits.max_batch_size,
        kv_budget_bytes=budget,
    )


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """For a GPU its whole memory (the weights on it are subtracted by plan_memory); for the cpu
    MemAvailable of this machine (Linux), else the physical memory size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

"""How much memory an engine needs, and how many sequences its KV cache holds.

Shared by `llmbuild plan` (before a build) and the runtime (when it allocates the cache), so that
the numbers a user plans with are the numbers the server uses. `plan` adds the activations of the
largest step and a fixed overhead to tell whether an engine fits a machine (bench/plan_vs_rss.py
compares the sum with the peak resident set of a real run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmbuild.errors import LLMBuildError
from llmbuild.model_config import ModelConfig
from llmbuild.recipe import EngineLimits, KVCacheSection

HOST_OVERHEAD_BYTES = 480 << 20
"""One CPU engine process beside its weights, KV cache and activations: Python, torch, the tokenizer,
the op library and the AOTInductor runtime, and what the first steps leave allocated (thread pools,
oneDNN kernels, allocator arenas). Measured by bench/plan_vs_rss.py: 416-439 MiB after load on the demo
and TinyLlama engines, 25-75 MiB more after their first step."""
GPU_OVERHEAD_BYTES = 1 << 30
"""A cuda engine's GPU memory beside weights, KV cache and activations: the CUDA context, cuBLAS
workspaces, compiled kernels, the caching allocator's slack (an allowance, not measured here)."""


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Weights and KV-cache sizing of an engine: all its ranks together (they share this machine)."""

    weight_bytes: int
    kv_bytes_per_token: int
    block_size: int
    max_seq_len: int
    max_batch_size: int
    kv_budget_bytes: int
    activation_bytes: int = 0
    """Peak activations of the largest step (`plan` only; see step_activation_bytes)."""
    overhead_bytes: int = 0
    """Fixed cost of the engine processes (`plan` only; HOST_OVERHEAD_BYTES / GPU_OVERHEAD_BYTES)."""

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

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.num_blocks * self.kv_bytes_per_block

    @property
    def required_bytes(self) -> int:
        """Memory the running engine needs: weights + KV cache + activations + overhead."""
        return self.total_bytes + self.activation_bytes + self.overhead_bytes

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
    limits: EngineLimits,
    kv_cache: KVCacheSection,
    available_bytes: int | None,
    activation_bytes: int = 0,
    overhead_bytes: int = 0,
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
        activation_bytes=activation_bytes,
        overhead_bytes=overhead_bytes,
    )


def largest_step_tokens(limits: EngineLimits) -> int:
    """Most tokens one step can hold: max_num_tokens, unless max_batch_size full sequences are fewer."""
    return min(limits.max_num_tokens, limits.max_batch_size * limits.max_seq_len)


def step_activation_bytes(cfg: ModelConfig, tokens: int, itemsize: int, tp: int = 1) -> int:
    """Peak activations of a step of `tokens` tokens, all ranks together.

    The step's two high points, of which the larger counts:
    - a decoder layer's MLP, per token: the residual stream and its norm [h] + the fused gate|up output
      [2 i / tp] + the SwiGLU product [i / tp], in the model dtype, on every rank;
    - the logits: one fp32 row of the vocabulary per token when a request scores its prompt
      (prompt_logprobs), and the runtime's fp32 log-softmax of them (rank 0 only).
    """
    mlp = tokens * (2 * cfg.hidden_size + 3 * cfg.intermediate_size // tp) * itemsize * tp
    logits = 2 * tokens * cfg.vocab_size * 4
    return max(mlp, logits)


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

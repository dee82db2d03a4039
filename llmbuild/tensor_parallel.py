"""Tensor parallelism at the level of shapes: how a model splits across ranks (Megatron-style).

    rank r of N holds
      attention  q heads   [r*H/N, (r+1)*H/N)                  column-parallel qkv (rows of q, k, v)
                 kv heads  [r*Hkv/N, ...)  if Hkv >= N,  else kv head r // (N/Hkv) (replicated)
                 o         the columns of its q heads           row-parallel, then all-reduce
      MLP        gate, up  rows [r*I/N, (r+1)*I/N)              column-parallel gate_up
                 down      the same columns                     row-parallel, then all-reduce
      replicated embedding, norms, lm_head (every rank computes the full logits; rank 0 samples)

Shared by the builder (which shards weights and builds each rank's graph) and the runtime (which
sizes each rank's KV cache), so both agree on every rank's shapes.
"""

from __future__ import annotations

import torch

from llmbuild.model_config import ModelConfig

GROUP_NAME = "0"
"""The process group the graphs' all-reduces name: the default (world) group, which torch.distributed
names "0" in a process that creates it first. The runtime checks this before running a step."""


def split_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why `cfg` cannot be split across `tp` ranks (empty when it can)."""
    if tp == 1:
        return []
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"num_attention_heads ({cfg.num_heads}) is not divisible by tensor_parallel ({tp})")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        problems.append(
            f"num_key_value_heads ({cfg.num_kv_heads}) neither divides nor is divisible by tensor_parallel ({tp})"
        )
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size ({cfg.intermediate_size}) is not divisible by tensor_parallel ({tp})")
    return problems


def rank_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shapes one rank's graph computes with: a 1/tp share of the heads and of the MLP."""
    if tp == 1:
        return cfg
    return cfg.model_copy(
        update={
            "num_heads": cfg.num_heads // tp,
            "num_kv_heads": max(cfg.num_kv_heads // tp, 1),
            "intermediate_size": cfg.intermediate_size // tp,
        }
    )


def kv_heads_of_rank(cfg: ModelConfig, tp: int, rank: int) -> range:
    """The global kv heads rank `rank` holds (one replicated head when there are fewer than ranks)."""
    if cfg.num_kv_heads >= tp:
        per_rank = cfg.num_kv_heads // tp
        return range(rank * per_rank, (rank + 1) * per_rank)
    ranks_per_head = tp // cfg.num_kv_heads
    return range(rank // ranks_per_head, rank // ranks_per_head + 1)


def column_rows(cfg: ModelConfig, tp: int, rank: int, module: str) -> torch.Tensor:
    """Output rows of a column-parallel projection ("attn.qkv" or "mlp.gate_up") that rank `rank` keeps.

    Indices into the full fused projection's rows (`cfg` the full model's), slice by slice: the rank's
    q rows, then its k and v rows (a replicated kv head when there are fewer kv heads than ranks); or
    its gate rows, then the same rows of up.
    """
    if module == "attn.qkv":
        d, q = cfg.head_dim, cfg.num_heads * cfg.head_dim
        heads = cfg.num_heads // tp
        kv = kv_heads_of_rank(cfg, tp, rank)
        q_rows = torch.arange(rank * heads * d, (rank + 1) * heads * d)
        k_rows = torch.arange(kv.start * d, kv.stop * d) + q
        v_rows = k_rows + cfg.num_kv_heads * d
        return torch.cat([q_rows, k_rows, v_rows])
    inter = cfg.intermediate_size
    share = inter // tp
    gate = torch.arange(rank * share, (rank + 1) * share)
    return torch.cat([gate, gate + inter])

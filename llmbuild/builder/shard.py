"""Split a built model's state dict into tensor-parallel ranks (see llmbuild/tensor_parallel.py).

Works on the tensors of every weight format alike, because each shards along whole rows or whole
input groups: column-parallel layers (qkv, gate_up) keep their ranks' output rows of every tensor
(weight, scales, mins, bias); row-parallel layers (o, down) keep their ranks' input columns of the
weight (packed int4: 64 columns are 32 whole bytes) and of per-group scales / mins, while per-row
int8 scales stay whole. A row-parallel bias is added once: rank 0 holds it, the others hold zeros,
so that every rank's graph has the same shapes (one compiled package serves them all). int8 KV
scales go with their kv heads. W8A8 shards as int8 does; a row-parallel rank quantizes its own input
columns per token (with their own absmax), so its partial sums round a little differently from one
rank's.
"""

from __future__ import annotations

import torch

from llmbuild.model_config import ModelConfig
from llmbuild.tensor_parallel import column_rows, kv_heads_of_rank


def shard_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors of a full model's state dict (`cfg` the full model's config)."""
    if tp == 1:
        return state
    out = {}
    for name, t in state.items():
        module, _, kind = name.rpartition(".")
        layer_module = module.partition(".")[2].partition(".")[2] if module.startswith("layers.") else ""
        if kind == "kv_scales":  # [2, H_kv]: the rank's kv heads
            kv = kv_heads_of_rank(cfg, tp, rank)
            out[name] = t[:, kv.start : kv.stop].contiguous()
        elif layer_module in ("attn.qkv", "mlp.gate_up"):
            out[name] = t.index_select(0, column_rows(cfg, tp, rank, layer_module))
        elif layer_module in ("attn.o", "mlp.down"):
            if kind == "bias":
                out[name] = t.clone() if rank == 0 else torch.zeros_like(t)
            elif t.dim() == 2:  # weight [N, K] (packed int4 [N, K/2]) or per-group scales / mins [N, K/group]
                share = t.shape[1] // tp
                out[name] = t[:, rank * share : (rank + 1) * share].contiguous()
            else:  # per-row int8 scales: every rank's partial sums use the whole row's scale
                out[name] = t.clone()
        else:
            out[name] = t
    return out

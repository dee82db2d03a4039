"""The paged KV cache's tensors, allocated per rank (the block pool hands out their blocks)."""

from __future__ import annotations

import torch

from llmbuild.model_config import ModelConfig


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """One K and one V tensor per layer, each [num_blocks, num_kv_heads, block_size, head_dim].

    NOTE: separate tensors per layer, never views of one stacked tensor (pytorch issue 198068).
    """
    shape = (num_blocks, model.num_kv_heads, block_size, model.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * model.num_layers)]

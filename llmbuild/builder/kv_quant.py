"""INT8 KV cache: one scale per kv head for K and one for V in every layer, calibrated at build time.

A head's scale is the largest |K| (after RoPE and QK-norm) or |V| the model writes to the cache for
that head over the calibration windows, divided by 127: TensorRT-LLM's int8 KV calibration, per
head rather than per tensor, since heads differ in range by an order of magnitude (a key head
carrying a RoPE outlier channel). Larger values at run time saturate. The scales become buffers
of the attention modules (graph constants in the engine's weights); the graph then calls
`quantized_paged_attention` on int8 caches (plugins/paged_attention.py).
"""

from __future__ import annotations

import torch

from llmbuild.builder.models.llama import Attention, LlamaModel, prefill_metadata
from llmbuild.plugins.paged_attention import INT8_MAX


def kv_absmax(model: LlamaModel, windows: torch.Tensor, chunk_tokens: int = 4096, block_size: int = 16) -> torch.Tensor:
    """fp32 [num_layers, 2, num_kv_heads]: per layer, the largest |K| and |V| of each kv head over
    the token windows [num, seq_len], each chunk of windows prefilled in one step of the model."""
    cfg = model.cfg
    num, seq_len = windows.shape
    per_chunk = max(1, chunk_tokens // seq_len)
    absmax = torch.zeros(cfg.num_layers, 2, cfg.num_kv_heads)
    for start in range(0, num, per_chunk):
        chunk = windows[start : start + per_chunk]
        positions, meta, blocks = prefill_metadata(len(chunk), seq_len, block_size)
        shape = (blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        # slots no token writes stay zero: they cannot raise a maximum of absolute values
        caches = [torch.zeros(shape, dtype=model.embed.weight.dtype) for _ in range(2 * cfg.num_layers)]
        with torch.inference_mode():
            model(chunk.flatten(), positions, *meta, torch.zeros(1, dtype=torch.int64), caches)
        for i, cache in enumerate(caches):
            absmax[i // 2, i % 2] = torch.maximum(absmax[i // 2, i % 2], cache.abs().amax(dim=(0, 2, 3)).float())
    return absmax


def quantize_kv_cache(model: LlamaModel, absmax: torch.Tensor) -> None:
    """Give every attention layer its int8 KV scales (absmax / 127; a head that was always zero gets 1)."""
    scales = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax)).float()
    for layer, layer_scales in zip(model.layers, scales, strict=True):
        attn = layer.get_submodule("attn")
        assert isinstance(attn, Attention)
        attn.kv_scales = layer_scales.clone()

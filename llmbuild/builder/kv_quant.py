"""INT8 / FP8 KV cache: one scale per kv head for K and one for V in every layer, calibrated at build time.

A head's scale is the largest |K| (after RoPE and QK-norm) or |V| the model writes to the cache for
that head over the calibration windows, divided by the largest code (127 for int8, 448 for e4m3):
TensorRT-LLM's int8 KV calibration, per
head rather than per tensor, since heads differ in range by an order of magnitude (a key head
carrying a RoPE outlier channel). Larger values at run time saturate. The scales become buffers
of the attention modules (graph constants in the engine's weights); the graph then calls
`quantized_paged_attention` on int8 or fp8 caches (plugins/paged_attention.py).
"""

from __future__ import annotations

import torch

from llmbuild.builder.models.llama import Attention, LlamaModel, prefill_metadata
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.plugins.paged_attention import CODE_MAX


def kv_absmax(
    model: LlamaModel,
    windows: torch.Tensor,
    chunk_tokens: int = 4096,
    block_size: int = 16,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """fp32 [num_layers, 2, num_kv_heads]: per layer, the largest |K| and |V| of each kv head over
    the token windows [num, seq_len], each chunk of windows prefilled in one step of the model
    (`progress` counts the windows done)."""
    cfg, device = model.cfg, model.embed.weight.device
    num, seq_len = windows.shape
    per_chunk = max(1, chunk_tokens // seq_len)
    absmax = torch.zeros(cfg.num_layers, 2, cfg.num_kv_heads)
    for start in range(0, num, per_chunk):
        chunk = windows[start : start + per_chunk].to(device)
        positions, meta, blocks = prefill_metadata(len(chunk), seq_len, block_size, device)
        shape = (blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        # slots no token writes stay zero: they cannot raise a maximum of absolute values
        caches = [torch.zeros(shape, dtype=model.embed.weight.dtype, device=device) for _ in range(2 * cfg.num_layers)]
        with torch.inference_mode():
            ids = chunk.flatten()
            no_adapters = torch.zeros(len(ids), dtype=torch.int32, device=device)
            model(ids, positions, *meta, torch.zeros(1, dtype=torch.int64, device=device), no_adapters, caches)
        for i, cache in enumerate(caches):
            top = cache.abs().amax(dim=(0, 2, 3)).float().cpu()
            absmax[i // 2, i % 2] = torch.maximum(absmax[i // 2, i % 2], top)
        progress(start + len(chunk), num)
    return absmax


def quantize_kv_cache(model: LlamaModel, absmax: torch.Tensor, codes: torch.dtype = torch.int8) -> None:
    """Give every attention layer its KV scales for a cache of `codes` (int8 or float8_e4m3fn):
    absmax / the largest code; a head that was always zero gets 1."""
    scales = torch.where(absmax > 0, absmax / CODE_MAX[codes], torch.ones_like(absmax)).float()
    model.kv_codes = codes
    for layer, layer_scales in zip(model.layers, scales, strict=True):
        attn = layer.get_submodule("attn")
        assert isinstance(attn, Attention)
        attn.kv_scales = layer_scales.to(model.embed.weight.device, copy=True)

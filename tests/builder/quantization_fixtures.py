"""Shared pieces of the quantization tests: the trained demo model, a copy of it with outlier
channels, held-out windows and calibration windows, and a sequence's logits in one prefill step."""

from __future__ import annotations

from pathlib import Path

import torch

from llmbuild.builder.calibration import calibration_windows
from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.models.llama import LlamaModel, prefill_metadata
from llmbuild.builder.weights import load_weights
from llmbuild.recipe import CalibrationSection, PluginsSection

DEMO = Path(__file__).parents[2] / "models" / "demo"
SMALL_CALIBRATION = CalibrationSection(num_samples=16, seq_len=256, seed=0)
W8A8_DEMO = {  # the recipe sections of the demo W8A8 engine the builder tests share (built once per session)
    "model": {"dtype": "bfloat16"},
    "target": {"backend": "compiled"},
    "quantization": {
        "weights": "int8",
        "activations": "int8",
        "method": "smoothquant",
        "calibration": {"num_samples": 16, "seq_len": 256, "seed": 0},
    },
    "quality": {"max_kl": 0.02, "min_top1": 0.9},
}


def demo_model() -> LlamaModel:
    ckpt = Checkpoint.open(DEMO)
    model = LlamaModel.empty(ckpt.config, 512, torch.bfloat16, PluginsSection())
    load_weights(model, ckpt)
    return model


def with_outlier_channels(model: LlamaModel) -> LlamaModel:
    """The same function with a few activation channels 16x larger and their weight columns 16x
    smaller (powers of two: exact in bf16) — the outlier structure of large trained models, which
    round-to-nearest handles badly and activation-aware methods are built for."""
    hidden, inter, n = torch.tensor([3, 77, 150, 201]), torch.tensor([5, 300, 600]), model.cfg.intermediate_size
    for layer in model.layers:
        for norm, proj in ((layer.attn_norm, layer.attn.qkv), (layer.mlp_norm, layer.mlp.gate_up)):
            norm.weight.data[hidden] *= 16
            proj.weight.data[:, hidden] /= 16
        layer.mlp.gate_up.weight.data[n + inter] *= 16
        layer.mlp.down.weight.data[:, inter] /= 16
    return model


def small_calibration() -> torch.Tensor:
    return calibration_windows(SMALL_CALIBRATION, DEMO, DEMO)


def sequence_logits(model: LlamaModel, ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """fp32 logits [L, vocab] of one sequence, prefilled in one step through the paged graph."""
    cfg, n = model.cfg, len(ids)
    positions, meta, blocks = prefill_metadata(1, n, block_size)
    caches = [
        torch.zeros(blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=model.kv_cache_dtype())
        for _ in range(2 * cfg.num_layers)
    ]
    with torch.inference_mode():
        return model(ids, positions, *meta, torch.arange(n), torch.zeros(len(ids), dtype=torch.int32), caches)

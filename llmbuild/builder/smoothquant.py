"""SmoothQuant (Xiao et al., 2023): activation outliers moved into the weights before W8A8 quantization.

Per-token int8 activations lose a token's small channels to its few large (outlier) ones, while
per-row int8 weights have range to spare. For each input channel j of the projections that read one
input, s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha) (x over the calibration tokens, w over the
rows of all those projections); x_j / s_j and w_j * s_j give the same products with flatter
activations. The 1 / s is folded into the op that produces the input (as AWQ folds its scales):

    attn_norm weight        -> qkv columns
    v rows of qkv           -> o columns       attention mixes v rows: the q heads reading one kv head
                                                 share its factor (the max of their channels' statistics)
    mlp_norm weight         -> gate_up columns
    up rows of gate_up      -> down columns    silu(gate) * up is linear in up

Only the projections being quantized are smoothed. Smoothing leaves every layer's function unchanged
(up to the rounding of the folded weights to the model dtype), so the layer-by-layer pass feeds each
layer the unsmoothed model's inputs; the smoothed projections are then rounded to nearest (per-row
int8) by builder/quantize.py.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from typing import cast

import torch
from torch import nn

from llmbuild.builder.awq import SITES, fold_into_norm, fold_into_rows
from llmbuild.builder.calibration import LayerwisePass, observe_inputs
from llmbuild.builder.models.llama import DecoderLayer, LlamaModel
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.model_config import ModelConfig

FACTOR_RANGE = (1e-5, 1e5)
"""Factors are clamped to this range: a channel that is all zeros (in x or in w) gets a finite factor."""


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = max|x| ** alpha / max|w| ** (1 - alpha) per input channel (statistics [K], clamped)."""
    lo, hi = FACTOR_RANGE
    s = x_absmax.float().clamp(min=lo).pow(alpha) / w_absmax.float().clamp(min=lo).pow(1 - alpha)
    return s.clamp(lo, hi)


def smooth_model(
    model: LlamaModel,
    windows: torch.Tensor,
    alpha: float,
    chosen: Collection[str],
    progress: Progress = no_progress,
) -> None:
    """Fold SmoothQuant factors into `model` (in place) for the decoder projections named in `chosen`
    (`layers.3.attn.qkv`, ...), from the activations of calibration `windows` [num_samples, seq_len];
    `progress` counts the decoder layers done."""
    runner = LayerwisePass(model, windows)
    layers = cast(list[DecoderLayer], model.layers)
    for i, layer in enumerate(layers):
        sites = [site for site in SITES if f"layers.{i}.{site}" in chosen]
        absmax: dict[str, torch.Tensor] = {}
        remove = observe_inputs({site: layer.get_submodule(site) for site in sites}, partial(_observe, absmax))
        states = runner.run(layer)
        remove()
        _smooth_layer(layer, absmax, alpha, model.cfg)
        runner.advance(states)
        progress(i + 1, len(layers))


def _observe(absmax: dict[str, torch.Tensor], site: str, x: torch.Tensor) -> None:
    seen = x.float().abs().amax(0)
    absmax[site] = torch.maximum(absmax[site], seen) if site in absmax else seen


def _smooth_layer(layer: DecoderLayer, x_absmax: dict[str, torch.Tensor], alpha: float, cfg: ModelConfig) -> None:
    """Fold the factors of the sites observed in `x_absmax` (input channel maxima) into one layer."""
    linears = {site: cast(nn.Linear, layer.get_submodule(site)) for site in SITES}
    w = {site: m.weight.float() for site, m in linears.items()}
    b: dict[str, torch.Tensor | None] = {
        site: None if m.bias is None else m.bias.float() for site, m in linears.items()
    }
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def factors(site: str) -> torch.Tensor | None:
        if site not in x_absmax:
            return None
        return smoothing_factors(x_absmax[site], w[site].abs().amax(0), alpha)

    # o and down first: their folds change rows of qkv and gate_up, whose factors then see the weights
    # that will be rounded
    if "attn.o" in x_absmax:
        # o's input channel (h, d) reads v row (h // rep, d): one factor per v row
        per_kv = partial(_max_over_shared_heads, cfg)
        per_v_row = smoothing_factors(per_kv(x_absmax["attn.o"]), per_kv(w["attn.o"].abs().amax(0)), alpha)
        fold_into_rows(w, b, "attn.qkv", q_rows + kv_rows, per_v_row)
        rep = cfg.num_heads // cfg.num_kv_heads
        per_column = per_v_row.reshape(cfg.num_kv_heads, 1, cfg.head_dim).expand(-1, rep, -1).reshape(-1)
        w["attn.o"] = w["attn.o"] * per_column
    if (s := factors("mlp.down")) is not None:
        fold_into_rows(w, b, "mlp.gate_up", cfg.intermediate_size, s)
        w["mlp.down"] = w["mlp.down"] * s
    if (s := factors("attn.qkv")) is not None:
        fold_into_norm(layer.attn_norm, s)
        w["attn.qkv"] = w["attn.qkv"] * s
    if (s := factors("mlp.gate_up")) is not None:
        fold_into_norm(layer.mlp_norm, s)
        w["mlp.gate_up"] = w["mlp.gate_up"] * s
    for site, m in linears.items():
        m.weight.data = w[site].to(m.weight.dtype)
        bias = b[site]
        if m.bias is not None and bias is not None:
            m.bias.data = bias.to(m.bias.dtype)


def _max_over_shared_heads(cfg: ModelConfig, stat: torch.Tensor) -> torch.Tensor:
    """A statistic of o's input channels [H * D] -> [H_kv * D]: the max over the q heads sharing a kv head."""
    rep = cfg.num_heads // cfg.num_kv_heads
    return stat.reshape(cfg.num_kv_heads, rep, cfg.head_dim).amax(1).reshape(-1)

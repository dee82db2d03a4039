"""AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"): scale and clip searches on calibration text.

Layer by layer, on the inputs the calibration windows produce at each of its projections:

1. Scale search. Input channels that carry large activations matter more to the output, so the
   weight's columns are multiplied by a per-channel s before rounding and the inverse is folded
   into the op that produces the input: the RMSNorm weight for qkv and gate_up, the v rows of qkv
   for o, the up rows of gate_up for down (the function is unchanged). s = mean|x| ** alpha /
   mean|w| ** (1 - alpha) (normalised), alpha chosen from a grid of 20 by the projection's output
   error after quantization; s = 1 (RTN) is a candidate too, so the search never does worse than
   RTN on its own objective. With grouped-query attention the heads reading one v row share its
   scale (AutoAWQ skips o in that case).
2. Clip search. Per group of each weight row, the quantization range is shrunk by the factor (1.0,
   0.95, ... 0.55) that minimises that group's share of the output error; not for the q and k rows,
   whose errors the output error does not measure well (as AutoAWQ).

The next layer sees the unquantized layer's outputs. Searches use a fixed sample of the calibration
tokens (SEARCH_TOKENS, CLIP_TOKENS); the scale statistic mean|x| uses all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import cast

import torch
from torch import nn

from llmbuild.builder.calibration import LayerwisePass, observe_inputs
from llmbuild.builder.models.llama import DecoderLayer, LlamaModel
from llmbuild.builder.quant_format import Grid
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.model_config import ModelConfig

SCALE_GRID = 20
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))
SEARCH_TOKENS = 2048
CLIP_TOKENS = 512
CLIP_ROWS = 512  # output rows per clip-search chunk (bounds its memory)
SITES = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")


class _Inputs:
    """Mean |x| per input channel over all tokens, and a seeded sample of the tokens themselves."""

    def __init__(self, keep_per_chunk: int, seed: int) -> None:
        self.keep, self.gen = keep_per_chunk, torch.Generator().manual_seed(seed)
        self.sum_abs: torch.Tensor | float = 0.0
        self.count = 0
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sum_abs = self.sum_abs + x.abs().sum(0)
        self.count += len(x)
        self.samples.append(x[torch.randperm(len(x), generator=self.gen)[: self.keep]])

    def mean_abs(self) -> torch.Tensor:
        return torch.as_tensor(self.sum_abs) / self.count

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def awq_quantize(
    model: LlamaModel, grids: dict[str, Grid], windows: torch.Tensor, progress: Progress = no_progress
) -> dict[str, nn.Module]:
    """Fold AWQ scales into `model` (in place) and return the quantized modules of the layers in `grids`
    (`progress` counts the decoder layers done)."""
    runner = LayerwisePass(model, windows)
    keep = math.ceil(SEARCH_TOKENS / len(runner.chunks))
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(cast(list[DecoderLayer], model.layers)):
        linears = {site: cast(nn.Linear, layer.get_submodule(site)) for site in SITES}
        inputs = {site: _Inputs(keep, seed=i) for site in SITES}
        remove = observe_inputs(linears, partial(_add_input, inputs))
        states = runner.run(layer)
        remove()
        out.update(_quantize_layer(layer, f"layers.{i}", linears, inputs, model.cfg, grids))
        runner.advance(states)
        progress(i + 1, len(model.layers))
    if "lm_head" in grids and model.lm_head is not None:
        out["lm_head"] = grids["lm_head"].module(model.lm_head.weight, model.lm_head.bias)
    return out


def _add_input(inputs: dict[str, _Inputs], site: str, x: torch.Tensor) -> None:
    inputs[site].add(x)


def _quantize_layer(
    layer: DecoderLayer,
    prefix: str,
    linears: dict[str, nn.Linear],
    inputs: dict[str, _Inputs],
    cfg: ModelConfig,
    grids: dict[str, Grid],
) -> dict[str, nn.Module]:
    """Scale search and folding, clip search and quantization of one decoder layer's projections."""
    names = {site: f"{prefix}.{site}" for site in SITES}
    w = {site: m.weight.float() for site, m in linears.items()}
    b: dict[str, torch.Tensor | None] = {
        site: None if m.bias is None else m.bias.float() for site, m in linears.items()
    }
    x = {site: inputs[site].sample() for site in SITES}
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def searched(site: str, share: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        if names[site] not in grids:
            return None
        s = search_scale(x[site], inputs[site].mean_abs(), w[site], grids[names[site]], share)
        w[site] = w[site] * s
        x[site] = x[site] / s
        return s

    if (s := searched("attn.qkv")) is not None:
        fold_into_norm(layer.attn_norm, s)
    rep = cfg.num_heads // cfg.num_kv_heads
    if (s := searched("attn.o", _share_across_heads(cfg.num_kv_heads, rep, cfg.head_dim))) is not None:
        per_v_row = s.reshape(cfg.num_kv_heads, rep, cfg.head_dim)[:, 0].reshape(-1)
        fold_into_rows(w, b, "attn.qkv", q_rows + kv_rows, per_v_row)
    if (s := searched("mlp.gate_up")) is not None:
        fold_into_norm(layer.mlp_norm, s)
    if (s := searched("mlp.down")) is not None:
        fold_into_rows(w, b, "mlp.gate_up", cfg.intermediate_size, s)

    out: dict[str, nn.Module] = {}
    for site, m in linears.items():
        bias = b[site]
        if names[site] not in grids:  # excluded: keeps its dtype, with any fold written back
            m.weight.data = w[site].to(m.weight.dtype)
            if m.bias is not None and bias is not None:
                m.bias.data = bias.to(m.bias.dtype)
            continue
        grid = grids[names[site]]
        first = q_rows + kv_rows if site == "attn.qkv" else 0  # q and k rows: no clipping
        clip = torch.ones(m.out_features, m.in_features // grid.group, 1)
        clip[first:] = search_clip(x[site][:CLIP_TOKENS], w[site][first:], grid)
        out[names[site]] = grid.module(w[site], None if bias is None else bias.to(m.weight.dtype), clip)
    return out


def search_scale(
    x: torch.Tensor,
    mean_abs: torch.Tensor,
    w: torch.Tensor,
    grid: Grid,
    share: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-input-channel scale s [K] minimising |x w^T - (x / s) Q(w s)^T|^2: s = 1 (RTN) or
    mean|x| ** alpha / mean|w| ** (1 - alpha) (w normalised per group; AutoAWQ's "duo" scaling) for
    alpha in the grid."""
    y = x @ w.T
    wg = w.abs().reshape(w.shape[0], -1, grid.group)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(w.shape).mean(0)
    best = torch.ones_like(mean_abs)
    best_err = (x @ grid.fake(w).T - y).pow(2).mean().item()  # no scaling: RTN
    for step in range(SCALE_GRID):
        alpha = step / SCALE_GRID
        s = (mean_abs.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        if share is not None:
            s = share(s)
        s = s / (s.max() * s.min()).sqrt()
        err = (x @ (grid.fake(w * s) / s).T - y).pow(2).mean().item()
        if err < best_err:
            best_err, best = err, s
    return best


def search_clip(x: torch.Tensor, w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per-group range factor [N, K / group, 1] minimising each group's output error on tokens x [T, K]."""
    n, k = w.shape
    groups = k // grid.group
    xg = x.reshape(len(x), groups, grid.group)
    best = torch.ones(n, groups, 1)
    for r0 in range(0, n, CLIP_ROWS):
        wg = w[r0 : r0 + CLIP_ROWS].reshape(-1, groups, grid.group)
        ref = torch.einsum("tgk,rgk->rgt", xg, wg)
        best_err = torch.full(wg.shape[:2], math.inf)
        for ratio in CLIP_RATIOS:
            scale, low = grid.fit(wg, ratio)
            dq = grid.round(wg, scale, low) * scale + low
            err = (torch.einsum("tgk,rgk->rgt", xg, dq) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + CLIP_ROWS][better] = ratio
    return best


def _share_across_heads(kv_heads: int, rep: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """o's input channels of the `rep` heads that read one v row get one scale (their mean)."""

    def share(s: torch.Tensor) -> torch.Tensor:
        per_row = s.reshape(kv_heads, rep, head_dim).mean(1, keepdim=True)
        return per_row.expand(kv_heads, rep, head_dim).reshape(-1)

    return share


def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """Divide an RMSNorm's weight by s: its outputs, the next projections' inputs, shrink by s."""
    assert isinstance(norm.weight, torch.Tensor)  # an RMSNorm
    norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)


def fold_into_rows(
    w: dict[str, torch.Tensor], b: dict[str, torch.Tensor | None], site: str, first: int, s: torch.Tensor
) -> None:
    """Divide rows first .. first + len(s) of a projection (and its bias) by s: its outputs shrink by s."""
    rows = slice(first, first + len(s))
    w[site] = w[site].clone()
    w[site][rows] /= s[:, None]
    bias = b[site]
    if bias is not None:
        b[site] = bias = bias.clone()
        bias[rows] /= s

"""Weight quantization of a model graph: linear layers replaced by quantized ones, in place.

Formats: int8 with one scale per output row (symmetric), int4 in groups of `group_size` columns
(asymmetric: a scale and a min per group). Methods: round to nearest (rtn), AWQ (builder/awq.py:
activation-aware per-channel scales and clipping ranges searched on calibration text) and GPTQ
(builder/gptq.py: rounding with Hessian-based error compensation). `exclude` patterns (fnmatch, on
our module names such as `layers.0.mlp.down` or `lm_head`) keep chosen layers in the model dtype;
a tied lm_head shares the embedding matrix and always stays in the model dtype.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmbuild.errors import RecipeError

if TYPE_CHECKING:
    from llmbuild.builder.models.llama import LlamaModel
from llmbuild.plugins.linear_fp8 import quantize_fp8
from llmbuild.plugins.linear_int4 import int4_params, pack_int4, round_int4
from llmbuild.plugins.linear_int8 import int8_scales, round_int8
from llmbuild.recipe import QuantizationSection


class ScaledLinear(nn.Module):
    """int8 or float8_e4m3fn weight [N, K] with scales (int8: one per row, in the model dtype; fp8: fp32,
    one per row or one for the tensor), run by the linear_int8 or linear_fp8 plugin op."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = q.shape
        self.op = torch.ops.llmbuild.linear_fp8 if q.dtype == torch.float8_e4m3fn else torch.ops.llmbuild.linear_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.scales, self.bias)


class Int4Linear(nn.Module):
    """Packed 4-bit weight [N, K/2] with a bf16 scale and min per group, run by the linear_int4 plugin op."""

    weight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", pack_int4(q))
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.llmbuild.linear_int4(x, self.weight, self.scales, self.mins, self.bias)


@dataclass(frozen=True)
class Grid:
    """A weight format's grid: w ~ q * scale + min, q in [qmin, qmax], one (scale, min) per `group` columns.

    int8: symmetric (min 0), group = the whole row, scales in the model dtype. int4: asymmetric, the
    range of each group spans 0, scales and mins in bf16. Values are rounded against the stored
    (rounded) scale and min, so the grid quantized onto is the one the kernel multiplies with.
    """

    fmt: str
    group: int
    dtype: torch.dtype

    @staticmethod
    def of(quantization: QuantizationSection, in_features: int, dtype: torch.dtype) -> Grid:
        if quantization.weights == "int8":
            return Grid("int8", in_features, dtype)
        return Grid("int4", quantization.group_size, torch.bfloat16)

    @property
    def qmax(self) -> int:
        return 127 if self.fmt == "int8" else 15

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, min) [..., 1] in fp32 (rounded to the stored dtype) for groups w [..., group], with
        the range shrunk by `clip` (<= 1; clipping search)."""
        if self.fmt == "int8":
            scale = int8_scales(w, self.dtype, clip)
            return scale, torch.zeros_like(scale)
        return int4_params(w, clip)

    def round(self, w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """q (float) of w on the grid (scale, min)."""
        return round_int8(w, scale) if self.fmt == "int8" else round_int4(w, scale, low)

    def fake(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
        """w [N, K] quantized and dequantized (fp32); `clip` broadcasts against [N, K / group, 1]."""
        n, k = w.shape
        g = w.float().reshape(n, k // self.group, self.group)
        scale, low = self.fit(g, clip)
        return (self.round(g, scale, low) * scale + low).reshape(n, k)

    def module(self, w: torch.Tensor, bias: torch.Tensor | None, clip: torch.Tensor | float = 1.0) -> nn.Module:
        """The quantized module of weight w [N, K] (fp32 or model dtype), rounded to nearest."""
        n, k = w.shape
        g = w.float().reshape(n, k // self.group, self.group)
        scale, low = self.fit(g, clip)
        return self.module_from_codes(self.round(g, scale, low).reshape(n, k), scale[..., 0], low[..., 0], bias)

    def module_from_codes(
        self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """The quantized module of codes q [N, K] (float) with per-group scale, min [N, K / group]."""
        if self.fmt == "int8":
            return ScaledLinear(q.to(torch.int8), scale.reshape(-1).to(self.dtype), bias)
        return Int4Linear(q.to(torch.uint8), scale.to(self.dtype), low.to(self.dtype), bias)


def chosen_linears(model: nn.Module, quantization: QuantizationSection) -> dict[str, nn.Linear]:
    """The linear layers to quantize, by our module name: every nn.Linear not excluded, in model order."""
    chosen = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n: m for n, m in chosen.items() if not excluded(n, quantization)}


def excluded(name: str, quantization: QuantizationSection) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in quantization.exclude)


def check_group_fit(in_features: dict[str, int], quantization: QuantizationSection) -> None:
    """int4 packs 64 columns per block and groups `group_size` columns: every quantized K must fit both."""
    if quantization.weights != "int4":
        return
    g = quantization.group_size
    misfits = [f"{name} (K={k})" for name, k in in_features.items() if k % max(g, 64)]
    if misfits:
        raise RecipeError(
            f"int4 with group_size {g} needs every quantized layer's input size to be a multiple of "
            f"{max(g, 64)}; these are not: {', '.join(misfits[:4])}{' ...' if len(misfits) > 4 else ''} "
            "— choose a smaller quantization.group_size or add them to quantization.exclude"
        )


def quantized_bytes(out_features: int, in_features: int, quantization: QuantizationSection, itemsize: int) -> int:
    """Bytes of one projection's weight in the engine (bias excluded): codes plus scales (and mins)."""
    n, k = out_features, in_features
    if quantization.weights == "int8":
        return n * k + n * itemsize
    if quantization.weights == "int4":
        return n * k // 2 + 2 * n * (k // quantization.group_size) * 2  # bf16 scales and mins
    if quantization.weights == "fp8":
        return n * k + (n if quantization.fp8_scales == "channel" else 1) * 4  # fp32 scales
    return n * k * itemsize


def quantize_model(
    model: LlamaModel, quantization: QuantizationSection, calibration: torch.Tensor | None = None
) -> list[str]:
    """Quantize every nn.Linear not excluded, in place; returns the names of the quantized layers.

    awq and gptq need `calibration`, token windows [num_samples, seq_len] (builder/calibration.py).
    """
    if quantization.weights not in ("int8", "int4", "fp8"):
        raise NotImplementedError(f"weights={quantization.weights}")
    chosen = chosen_linears(model, quantization)
    if quantization.weights == "fp8":  # round to nearest only (the recipe allows no other method)
        replacements: dict[str, nn.Module] = {
            name: ScaledLinear(*quantize_fp8(m.weight.data, quantization.fp8_scales), m.bias)
            for name, m in chosen.items()
        }
        _replace(model, replacements)
        return list(chosen)
    check_group_fit({name: m.in_features for name, m in chosen.items()}, quantization)
    dtype = next(iter(chosen.values())).weight.dtype if chosen else torch.float32
    grids = {name: Grid.of(quantization, m.in_features, dtype) for name, m in chosen.items()}
    if quantization.method == "rtn":
        replacements = {name: grids[name].module(m.weight.data, m.bias) for name, m in chosen.items()}
    else:
        if calibration is None:
            raise ValueError(f"method={quantization.method} needs calibration token windows")
        from llmbuild.builder.awq import awq_quantize
        from llmbuild.builder.gptq import gptq_quantize

        run = awq_quantize if quantization.method == "awq" else gptq_quantize
        replacements = run(model, grids, calibration)
    _replace(model, replacements)
    return list(chosen)


def _replace(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, new in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)

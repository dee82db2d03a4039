"""The quantized weight formats every method writes (rtn, awq, gptq, smoothquant): their modules and grids.

int8: one scale per output row (symmetric); W8A8 stores the same and its op quantizes the activations
per token. int4: groups of `group` columns, a scale and a min per group (asymmetric). fp8 e4m3 reuses
ScaledLinear with fp32 scales. The grids hold the numerics the methods search over; the modules hold
the stored format the plugin ops run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

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


class W8A8Linear(ScaledLinear):
    """The int8 weight format (per-row scales in the model dtype) with int8 activations: the linear_w8a8
    plugin op quantizes each token's input to int8 and sums int8 products in int32 (SmoothQuant's W8A8)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(q, scales, bias)
        self.op = torch.ops.llmbuild.linear_w8a8


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
class Grid(ABC):
    """A weight format's grid: w ~ q * scale + min, q in [qmin, qmax], one (scale, min) per `group` columns,
    scales (and mins) stored in `dtype`.

    Values are rounded against the stored (rounded) scale and min, so the grid quantized onto is the
    one the kernel multiplies with.
    """

    group: int
    dtype: torch.dtype
    qmin: ClassVar[int]
    qmax: ClassVar[int]

    @abstractmethod
    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, min) [..., 1] in fp32 (rounded to the stored dtype) for groups w [..., group], with
        the range shrunk by `clip` (<= 1; clipping search)."""

    @abstractmethod
    def round(self, w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """q (float) of w on the grid (scale, min)."""

    @abstractmethod
    def module_from_codes(
        self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        """The quantized module of codes q [N, K] (float) with per-group scale, min [N, K / group]."""

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


@dataclass(frozen=True)
class Int8Grid(Grid):
    """Symmetric int8 (min 0); in the engine the group is the whole row and scales are in the model dtype."""

    qmin: ClassVar[int] = -127
    qmax: ClassVar[int] = 127

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        scale = int8_scales(w, self.dtype, clip)
        return scale, torch.zeros_like(scale)

    def round(self, w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return round_int8(w, scale)

    def module_from_codes(
        self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        return ScaledLinear(q.to(torch.int8), scale.reshape(-1).to(self.dtype), bias)


@dataclass(frozen=True)
class W8A8Grid(Int8Grid):
    """The int8 grid, stored as a W8A8Linear: the op quantizes its activations too."""

    def module_from_codes(
        self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        return W8A8Linear(q.to(torch.int8), scale.reshape(-1).to(self.dtype), bias)


@dataclass(frozen=True)
class Int4Grid(Grid):
    """Asymmetric int4: the range of each group spans 0; in the engine scales and mins are bf16."""

    qmin: ClassVar[int] = 0
    qmax: ClassVar[int] = 15

    def fit(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return int4_params(w, clip)

    def round(self, w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return round_int4(w, scale, low)

    def module_from_codes(
        self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        return Int4Linear(q.to(torch.uint8), scale.to(self.dtype), low.to(self.dtype), bias)


def grid_of(quantization: QuantizationSection, in_features: int, dtype: torch.dtype) -> Grid:
    """The grid a layer of `in_features` inputs in model dtype `dtype` is quantized onto (weights int8, with
    int8 activations or without, or int4)."""
    if quantization.weights == "int8":
        return W8A8Grid(in_features, dtype) if quantization.activations == "int8" else Int8Grid(in_features, dtype)
    return Int4Grid(quantization.group_size, torch.bfloat16)

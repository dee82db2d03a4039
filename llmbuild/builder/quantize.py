"""Weight quantization of a model graph: linear layers replaced by quantized ones, in place.

Round to nearest (RTN): int8 with one scale per output row, int4 in groups of `group_size` columns
(asymmetric: a scale and a min per group). `exclude` patterns (fnmatch, on our module names such as
`layers.0.mlp.down` or `lm_head`) keep chosen layers in the model dtype. A tied lm_head shares the
embedding matrix and always stays in the model dtype.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from llmbuild.errors import RecipeError
from llmbuild.plugins.linear_int4 import pack_int4, quantize_int4
from llmbuild.plugins.linear_int8 import quantize_int8
from llmbuild.recipe import QuantizationSection


class Int8Linear(nn.Module):
    """int8 weight [N, K] with one scale per output row, run by the linear_int8 plugin op."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scales = quantize_int8(linear.weight.data, linear.weight.dtype)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features


class Int4Linear(nn.Module):
    """Packed 4-bit weight [N, K/2] with a bf16 scale and min per group, run by the linear_int4 plugin op."""

    weight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        q, scales, mins = quantize_int4(linear.weight.data, group_size)
        self.register_buffer("weight", pack_int4(q))
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features


def quantize_model(model: nn.Module, quantization: QuantizationSection) -> list[str]:
    """Quantize every nn.Linear not excluded, in place; returns the names of the quantized layers."""
    if quantization.weights not in ("int8", "int4") or quantization.method != "rtn":
        raise NotImplementedError(f"weights={quantization.weights} method={quantization.method}")
    chosen = [
        (module, child_name, f"{name}.{child_name}" if name else child_name, child)
        for name, module in model.named_modules()
        for child_name, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]
    chosen = [c for c in chosen if not any(fnmatch.fnmatch(c[2], p) for p in quantization.exclude)]
    if quantization.weights == "int4":
        g = quantization.group_size
        misfits = [f"{full} (K={child.in_features})" for _, _, full, child in chosen if child.in_features % max(g, 64)]
        if misfits:
            raise RecipeError(
                f"int4 with group_size {g} needs every quantized layer's input size to be a multiple of "
                f"{max(g, 64)}; these are not: {', '.join(misfits[:4])}{' ...' if len(misfits) > 4 else ''} "
                "— choose a smaller quantization.group_size or add them to quantization.exclude"
            )
    for module, child_name, _, child in chosen:
        new = Int8Linear(child) if quantization.weights == "int8" else Int4Linear(child, quantization.group_size)
        setattr(module, child_name, new)
    return [full for _, _, full, _ in chosen]

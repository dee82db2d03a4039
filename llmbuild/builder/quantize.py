"""Weight quantization of a model graph: linear layers replaced by quantized ones, in place.

Round to nearest (RTN) per output row for int8 so far. `exclude` patterns (fnmatch, on our module
names such as `layers.0.mlp.down` or `lm_head`) keep chosen layers in the model dtype. A tied
lm_head shares the embedding matrix and always stays in the model dtype.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

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


def quantize_model(model: nn.Module, quantization: QuantizationSection) -> list[str]:
    """Quantize every nn.Linear not excluded, in place; returns the names of the quantized layers."""
    if quantization.weights != "int8" or quantization.method != "rtn":
        raise NotImplementedError(f"weights={quantization.weights} method={quantization.method}")
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(fnmatch.fnmatch(full, p) for p in quantization.exclude):
                setattr(module, child_name, Int8Linear(child))
                done.append(full)
    return done

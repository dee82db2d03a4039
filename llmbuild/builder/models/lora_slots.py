"""LoRA adapter slots in the model graph: per targeted projection, stacked A / B buffers that the
runtime fills with adapters, and the `llmbuild::lora` op adding each token's adapter to the
projection's output (plugins/lora.py). Names and shapes: lora_layout.py.

Slots are attached only for the export: the weights the builder saves never include them, so an
engine's weights (and its numerics for tokens of slot 0) are the same with and without a `lora` section.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmbuild.lora_layout import ProjectionSlots, projection_slots
from llmbuild.model_config import ModelConfig
from llmbuild.recipe import LoraSection


class LoraSlots(nn.Module):
    """The slots of one fused projection: y + (x A_s^T) B_s^T for each token's slot s."""

    a: torch.Tensor  # [S, n * R, in]
    b: torch.Tensor  # [S, R, out]: B_s transposed
    ranks: torch.Tensor  # [S, n] int32

    def __init__(self, layout: ProjectionSlots, lora: LoraSection, dtype: torch.dtype) -> None:
        super().__init__()
        self.slices = list(layout.slices)
        for name, shape in layout.shapes(lora).items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.int32 if name == "ranks" else dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor, lora_slots: torch.Tensor) -> torch.Tensor:
        return torch.ops.llmbuild.lora(x, y, self.a, self.b, self.ranks, lora_slots, self.slices)


def attach_lora_slots(layers: Iterable[nn.Module], cfg: ModelConfig, lora: LoraSection, dtype: torch.dtype) -> None:
    """Give every decoder layer (of a model at `cfg`'s shapes: a rank's) the slots `lora` asks for."""
    for layer in layers:
        for layout in projection_slots(cfg, lora):
            parent, _, name = layout.projection.partition(".")  # "attn.qkv" -> attn.qkv_lora
            setattr(layer.get_submodule(parent), f"{name}_lora", LoraSlots(layout, lora, dtype))

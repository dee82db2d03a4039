"""Where LoRA adapters live in an engine graph: the slot buffers of each targeted projection.

Projections are fused in the graph (q/k/v in `attn.qkv`, gate/up in `mlp.gate_up`), so one fused
projection carries the adapters of all its PEFT modules ("slices"), side by side:

    layers.{i}.{projection}_lora.a      [S, n * R, in]   slice j's A in rows j*R .. j*R + rank
    layers.{i}.{projection}_lora.b      [S, R, out]      slice j's B, transposed, in its own output columns
    layers.{i}.{projection}_lora.ranks  [S, n] int32     each slot's rank per slice (0: no adapter there)

S = max_loras + 1 (slot 0 is "no adapter" and stays zero), R = max_rank, n the slices of the fused
projection, `in` and `out` this rank's shapes (tensor_parallel.rank_config). The adapter's scale
(alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into B when an adapter is written into a slot, so
the graph multiplies by nothing else. The buffers are not in weights.safetensors: the runtime allocates
them zeroed at load (their size is `plan`'s to report) and writes adapters into them in place.

Shared by the builder (which puts the buffers in the graph) and the runtime (which allocates and fills
them), so both agree on every name and shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmbuild.model_config import ModelConfig
from llmbuild.recipe import LoraSection

PROJECTIONS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("q_proj", "k_proj", "v_proj"),
    "attn.o": ("o_proj",),
    "mlp.gate_up": ("gate_proj", "up_proj"),
    "mlp.down": ("down_proj",),
}
"""Each fused projection of the graph and the PEFT modules (slices) it is made of, in row order."""

ROW_PARALLEL = frozenset({"attn.o", "mlp.down"})
"""Projections split by input columns across tensor-parallel ranks (A splits by columns, B is whole);
the others split by output rows (B, stored transposed, splits along its last dimension; A is whole)."""


@dataclass(frozen=True, slots=True)
class ProjectionSlots:
    """One fused projection's adapter slots (the same in every layer)."""

    projection: str
    """The fused projection, e.g. "attn.qkv"."""
    modules: tuple[str, ...]
    """The PEFT modules of its slices, in row order (untargeted ones included: their rank stays 0)."""
    slices: tuple[int, ...]
    """Output rows of each slice on this rank."""
    in_features: int
    """Input features on this rank."""

    def shapes(self, lora: LoraSection) -> dict[str, tuple[int, ...]]:
        """Shape of each buffer, by its short name (a, b, ranks)."""
        slots, n = lora.max_loras + 1, len(self.slices)
        return {
            "a": (slots, n * lora.max_rank, self.in_features),
            "b": (slots, lora.max_rank, sum(self.slices)),
            "ranks": (slots, n),
        }


def projection_slots(cfg: ModelConfig, lora: LoraSection) -> list[ProjectionSlots]:
    """The projections that carry slots (any of their modules targeted), at `cfg`'s shapes (a rank's)."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    slices = {"attn.qkv": (q, kv, kv), "attn.o": (cfg.hidden_size,), "mlp.gate_up": (inter, inter)}
    slices["mlp.down"] = (cfg.hidden_size,)
    inputs = {"attn.qkv": cfg.hidden_size, "attn.o": q, "mlp.gate_up": cfg.hidden_size, "mlp.down": inter}
    return [
        ProjectionSlots(name, modules, slices[name], inputs[name])
        for name, modules in PROJECTIONS.items()
        if any(m in lora.target_modules for m in modules)
    ]


def buffer_specs(
    cfg: ModelConfig, lora: LoraSection, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every slot buffer of the graph, by its full name (a rank's, for a rank's `cfg`)."""
    specs = {}
    for i in range(cfg.num_layers):
        for p in projection_slots(cfg, lora):
            for short, shape in p.shapes(lora).items():
                specs[f"layers.{i}.{p.projection}_lora.{short}"] = (shape, torch.int32 if short == "ranks" else dtype)
    return specs


def allocate_buffers(
    cfg: ModelConfig, lora: LoraSection, dtype: torch.dtype, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Zeroed slot buffers (every slot empty), by name."""
    return {
        name: torch.zeros(shape, dtype=dt, device=device)
        for name, (shape, dt) in buffer_specs(cfg, lora, dtype).items()
    }


def buffer_bytes(cfg: ModelConfig, lora: LoraSection, dtype: torch.dtype) -> int:
    """Memory the slot buffers take on one rank."""
    total = 0
    for shape, dt in buffer_specs(cfg, lora, dtype).values():
        n = 1
        for s in shape:
            n *= s
        total += n * dt.itemsize
    return total

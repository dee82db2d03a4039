"""LoRA adapters in Hugging Face PEFT format, read into the engine's slot layout (llmbuild/lora_layout.py).

A PEFT adapter directory holds adapter_config.json and adapter_model.safetensors with one A [r, in] and
one B [out, r] per adapted module, under keys such as

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight      (peft's save_pretrained)
    base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight   (with the adapter's name)

The weights are authoritative: they say which modules of which layers are adapted and at what rank
(rank_pattern is what made them so); the config gives alpha (lora_alpha, alpha_pattern) and the
variant, and anything that is not plain LoRA is refused. Each module's scale (alpha / r, or
alpha / sqrt(r) with rsLoRA) is folded into B in fp32 before the cast to the engine's dtype, and the
modules of one fused projection are laid out side by side (q | k | v, gate | up):

    a      [n * R, in]   slice j's A in rows j*R .. j*R + r (zero below and for untargeted slices)
    b      [R, out]      slice j's scaled B, transposed: rows :r, its output columns
    ranks  [n] int32     r per slice, 0 where the slice is not adapted

Tensor parallel (llmbuild/tensor_parallel.py): column-parallel projections (qkv, gate_up) keep this
rank's output columns of b (its last dimension), slice by slice, and all of a; row-parallel ones (o,
down) keep this rank's input columns of a, and all of b. Everything is read and checked before an
adapter exists, so a refused adapter never touches the engine's buffers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmbuild.errors import LoraError
from llmbuild.lora_layout import ROW_PARALLEL, ProjectionSlots, projection_slots
from llmbuild.model_config import ModelConfig
from llmbuild.recipe import LORA_MODULES, LoraSection
from llmbuild.tensor_parallel import column_rows, split_problems

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

_PREFIX = "base_model.model."
"""What peft puts before a module's name in the model (model.layers.3.self_attn.q_proj)."""
_BASE_CHANGING_INITS = ("pissa", "olora", "corda")
"""init_lora_weights methods that also rewrite the base weights: such an adapter is only right on top of
its own modified base, until peft converts it (path_initial_model_for_weight_conversion)."""


class PeftLoraConfig(BaseModel):
    """The fields of a PEFT adapter_config.json that matter here (the others are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    peft_type: str
    r: int = Field(8, ge=1)
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    base_model_name_or_path: str | None = None
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    use_qalora: bool = False
    use_bdlora: Any = None
    alora_invocation_tokens: list[int] | None = None
    layer_replication: list[Any] | None = None
    target_parameters: list[str] | None = None
    trainable_token_indices: Any = None


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One adapter, ready to be copied into an engine slot (one tensor-parallel rank's share)."""

    name: str
    """The name requests address it by."""
    path: Path
    """The PEFT directory it was read from."""
    module_ranks: Mapping[str, int]
    """Rank of each adapted module, by "layers.{i}.{module}" (PEFT module names: q_proj, ...)."""
    tensors: Mapping[str, torch.Tensor]
    """One slot's tensors by slot buffer name (layers.{i}.{projection}_lora.{a,b,ranks}); projections
    of layers it does not adapt are absent (their slot is zeroed)."""

    @property
    def nbytes(self) -> int:
        """Memory its tensors take."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write_to(self, buffers: Mapping[str, torch.Tensor], slot: int) -> None:
        """Copy this adapter into slot `slot` of the engine's slot buffers, in place; every other slot
        buffer's row `slot` is zeroed. Checks all names and shapes before the first write."""
        lora_buffers = _slot_buffers(buffers, slot)
        for name, t in self.tensors.items():
            buf = lora_buffers.get(name)
            if buf is None or buf.shape[1:] != t.shape or buf.dtype != t.dtype:
                have = "missing" if buf is None else f"{list(buf.shape[1:])} {buf.dtype}"
                raise ValueError(
                    f"adapter {self.name!r}: slot buffer {name} is {have}, the adapter has {list(t.shape)} "
                    f"{t.dtype} (loaded for another engine's lora section or dtype)"
                )
        for name, buf in lora_buffers.items():
            if name in self.tensors:
                buf[slot].copy_(self.tensors[name])
            else:
                buf[slot].zero_()


def clear_slot(buffers: Mapping[str, torch.Tensor], slot: int) -> None:
    """Zero slot `slot` of every slot buffer (its adapter gone: ranks 0 everywhere)."""
    for buf in _slot_buffers(buffers, slot).values():
        buf[slot].zero_()


def _slot_buffers(buffers: Mapping[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
    """The LoRA slot buffers among `buffers`, after checking that `slot` is an adapter slot of theirs."""
    lora = {name: buf for name, buf in buffers.items() if name.rpartition(".")[0].endswith("_lora")}
    slots = {buf.shape[0] for buf in lora.values()}
    if len(slots) > 1 or not 1 <= slot < min(slots, default=0):
        raise ValueError(f"slot {slot} is not an adapter slot of these buffers (slot counts: {sorted(slots)})")
    return lora


def load_adapter(
    name: str,
    path: Path | str,
    cfg_full: ModelConfig,
    lora: LoraSection,
    dtype: torch.dtype,
    tp: int = 1,
    rank: int = 0,
) -> LoraAdapter:
    """Read and check the PEFT adapter in `path` for an engine of `cfg_full` (the unsharded model) with
    slots `lora`, as tensor-parallel rank `rank` of `tp` holds it. Raises LoraError, one line naming the
    adapter, the problem and the fix, for anything the engine cannot run."""
    if split_problems(cfg_full, tp) or not 0 <= rank < tp:
        raise ValueError(f"rank {rank} of tensor_parallel {tp} does not split this model")
    path = Path(path)
    fail = _Refusal(name, path)
    config = _read_config(path, fail)
    _check_variant(config, fail)
    modules = _read_modules(path, cfg_full, lora, fail)
    module_ranks = {f"layers.{layer}.{module}": a.shape[0] for (layer, module), (a, _, _) in modules.items()}
    scales = {key: _scale(config, _module_path(a_key), a.shape[0]) for key, (a, _, a_key) in modules.items()}
    tensors: dict[str, torch.Tensor] = {}
    for layer in sorted({layer for layer, _ in modules}):
        for p in projection_slots(cfg_full, lora):
            if any((layer, m) in modules for m in p.modules):
                slot = _projection_tensors(p, layer, modules, scales, lora.max_rank)
                for short, t in _shard(p, slot, cfg_full, tp, rank).items():
                    tensors[f"layers.{layer}.{p.projection}_lora.{short}"] = t if short == "ranks" else t.to(dtype)
    return LoraAdapter(name, path, module_ranks, tensors)


class _Refusal:
    """Builds the one-line LoraError of one adapter."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path

    def __call__(self, problem: str, fix: str) -> LoraError:
        return LoraError(f"adapter {self.name!r} ({self.path}): {problem}; {fix}")


def _read_config(path: Path, fail: _Refusal) -> PeftLoraConfig:
    if not path.is_dir():
        raise fail("no such adapter directory", "pass the directory PEFT's save_pretrained wrote")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise fail(f"no {CONFIG_FILE}", "pass a PEFT adapter directory (save_pretrained writes this file)")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{CONFIG_FILE} is unreadable or not JSON ({exc})", "re-save the adapter") from None
    if not isinstance(raw, dict):
        raise fail(f"{CONFIG_FILE} is not a JSON object", "re-save the adapter")
    if raw.get("peft_type") != "LORA":
        kind = f"a {raw['peft_type']!r} adapter" if "peft_type" in raw else "no PEFT adapter (no peft_type)"
        raise fail(
            f"is {kind}, not LoRA",
            "only LoRA adapters (peft_type LORA) load into LoRA slots; merge others into a checkpoint",
        )
    try:
        return PeftLoraConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise fail(f"{CONFIG_FILE}: {where}: {first['msg']}", "re-save the adapter with PEFT") from None


def _check_variant(config: PeftLoraConfig, fail: _Refusal) -> None:
    """Refuse what is not plain LoRA (W + scale * B @ A on q/k/v/o/gate/up/down)."""
    merge = "merge it into the base weights (merge_and_unload) and build an engine of the merged model"
    if config.use_dora:
        raise fail("is a DoRA adapter (use_dora: true), which LoRA slots cannot run", merge)
    if config.bias != "none" or config.lora_bias:
        what = f"bias: {config.bias!r}" if config.bias != "none" else "lora_bias: true"
        raise fail(f"trains biases ({what}), which LoRA slots do not hold", f"train with bias='none', or {merge}")
    if config.modules_to_save:
        saved = ", ".join(config.modules_to_save)
        raise fail(f"saves whole modules ({saved}: modules_to_save), which LoRA slots do not hold", merge)
    if config.fan_in_fan_out:
        raise fail("has fan_in_fan_out: true (Conv1D layers of GPT-2-style models)", "use an adapter of this base")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise fail(
            f"was initialised with {init}, which also changes the base weights",
            "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA",
        )
    extras = {
        "use_qalora": config.use_qalora,
        "use_bdlora": config.use_bdlora,
        "alora_invocation_tokens": config.alora_invocation_tokens,
        "layer_replication": config.layer_replication,
        "target_parameters": config.target_parameters,
        "trainable_token_indices": config.trainable_token_indices,
    }
    for field, value in extras.items():
        if value:
            raise fail(f"uses {field}, which LoRA slots cannot run", merge)


def _read_weights(path: Path, fail: _Refusal) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            raise fail(
                f"has {PICKLE_WEIGHTS_FILE} but no {WEIGHTS_FILE}",
                "re-save it with save_pretrained(..., safe_serialization=True)",
            )
        raise fail(f"no {WEIGHTS_FILE}", "pass a PEFT adapter directory (save_pretrained writes this file)")
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"{WEIGHTS_FILE} is corrupt or truncated ({detail})", "re-save or re-download the adapter") from None


_Modules = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, str]]
"""(layer, module) -> (A [r, in], B [out, r], A's key)."""


def _read_modules(path: Path, cfg: ModelConfig, lora: LoraSection, fail: _Refusal) -> _Modules:
    """The adapter's A and B per (layer, module), every one checked against the base model and the slots."""
    halves: dict[tuple[int, str, str], tuple[torch.Tensor, str]] = {}
    weights = _read_weights(path, fail)
    # LoRA matrices first: a whole weight saved beside them (peft saves a targeted lm_head's or
    # embed_tokens') is refused for the module the LoRA names, not for the stray copy
    for key in sorted(weights, key=lambda k: ".lora_" not in k):
        t = weights[key]
        layer, module, half = _parse_key(key, cfg, lora, fail)
        if (layer, module, half) in halves:
            raise fail(
                f"holds two lora_{half} for layers.{layer}.{module} ({halves[layer, module, half][1]} and {key})",
                "save one adapter per directory",
            )
        if not t.is_floating_point() or t.dim() != 2:
            raise fail(f"tensor {key} is {t.dtype} {list(t.shape)}, not a float matrix", "re-save the adapter")
        halves[layer, module, half] = (t, key)
    if not halves:
        raise fail(f"{WEIGHTS_FILE} holds no LoRA weights", "re-save the adapter")
    modules: _Modules = {}
    for (layer, module, half), (t, key) in halves.items():
        other = "B" if half == "A" else "A"
        if (layer, module, other) not in halves:
            raise fail(f"has lora_{half} of layers.{layer}.{module} but no lora_{other}", "re-save the adapter")
        if half == "A":
            b = halves[layer, module, "B"][0]
            _check_shapes(layer, module, t, b, cfg, lora, fail)
            modules[layer, module] = (t, b, key)
    return modules


def _parse_key(key: str, cfg: ModelConfig, lora: LoraSection, fail: _Refusal) -> tuple[int, str, str]:
    """(layer, module, "A" | "B") of a tensor key, or the refusal of a tensor the slots cannot hold."""
    parts = key.split(".")
    at = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
    if at is None:
        raise fail(
            f"holds {key}, a whole weight rather than a LoRA matrix (modules_to_save or a saved embedding?)",
            "save only the LoRA weights, or merge the adapter into the base weights",
        )
    kind, rest, module = parts[at], parts[at + 1 :], parts[at - 1] if at else ""
    if kind == "lora_magnitude_vector":
        raise fail(f"tensor {key} is a DoRA magnitude, which LoRA slots cannot run", "use a plain LoRA adapter")
    # peft writes lora_A.weight; some tools keep the adapter's name: lora_A.default.weight
    if kind not in ("lora_A", "lora_B") or not 1 <= len(rest) <= 2 or rest[-1] != "weight":
        if rest and rest[-1] == "bias":
            raise fail(f"tensor {key} is a LoRA bias, which LoRA slots do not hold", "train with lora_bias=False")
        if module not in LORA_MODULES:
            raise _unknown_module(module, key, fail)
        raise fail(f"tensor {key} is not a LoRA A or B weight", "re-save the adapter with PEFT")
    layer = next((int(parts[i + 1]) for i in range(at - 1) if parts[i] == "layers" and parts[i + 1].isdigit()), None)
    if module not in LORA_MODULES or layer is None:
        raise _unknown_module(module, key, fail)
    if module not in lora.target_modules:
        raise fail(
            f"adapts {module}, which this engine has no adapter slots for "
            f"(lora.target_modules: {', '.join(lora.target_modules)})",
            f"rebuild the engine with {module} in lora.target_modules, or use an adapter without it",
        )
    if layer >= cfg.num_layers:
        raise fail(
            f"adapts layer {layer}, but the model has {cfg.num_layers} layers",
            "use an adapter trained on this engine's base model",
        )
    return layer, module, kind[-1]


def _unknown_module(module: str, key: str, fail: _Refusal) -> LoraError:
    return fail(
        f"adapts {module or key}, which LoRA slots cannot hold (only {', '.join(LORA_MODULES)} of the layers)",
        "train the adapter without it, or merge it into the base weights",
    )


def _check_shapes(
    layer: int, module: str, a: torch.Tensor, b: torch.Tensor, cfg: ModelConfig, lora: LoraSection, fail: _Refusal
) -> None:
    q, kv, hidden, inter = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.hidden_size,
        cfg.intermediate_size,
    )
    in_features, out_features = {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[module]
    r = a.shape[0]
    if a.shape[1] != in_features or b.shape[0] != out_features or b.shape[1] != r or r == 0:
        raise fail(
            f"layers.{layer}.{module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, the base model needs "
            f"[r, {in_features}] and [{out_features}, r]",
            "use an adapter trained on this engine's base model",
        )
    if r > lora.max_rank:
        raise fail(
            f"layers.{layer}.{module} has rank {r}, above this engine's lora.max_rank {lora.max_rank}",
            f"rebuild the engine with lora.max_rank >= {r}, or use a lower-rank adapter",
        )


def _module_path(a_key: str) -> str:
    """The module's name in the model, as peft matches alpha_pattern against it (model.layers.3.self_attn.q_proj)."""
    path = a_key.removeprefix(_PREFIX)
    return path[: path.index(".lora_A")]


def _scale(config: PeftLoraConfig, module_path: str, r: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), alpha from the first alpha_pattern key that matches the
    module's name at a dot boundary (peft's get_pattern_key), else lora_alpha."""
    alpha = config.lora_alpha
    for pattern, value in (config.alpha_pattern or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _projection_tensors(
    p: ProjectionSlots,
    layer: int,
    modules: _Modules,
    scales: dict[tuple[int, str], float],
    max_rank: int,
) -> dict[str, torch.Tensor]:
    """One fused projection's slot tensors at the full model's shapes (fp32 a and b, int32 ranks)."""
    rank_r = max_rank
    a = torch.zeros(len(p.modules) * rank_r, p.in_features)
    b = torch.zeros(rank_r, sum(p.slices))
    ranks = torch.zeros(len(p.modules), dtype=torch.int32)
    offset = 0
    for j, (module, rows) in enumerate(zip(p.modules, p.slices, strict=True)):
        if (layer, module) in modules:
            lora_a, lora_b, _ = modules[layer, module]
            r = lora_a.shape[0]
            a[j * rank_r : j * rank_r + r] = lora_a.float()
            b[:r, offset : offset + rows] = lora_b.float().T * scales[layer, module]
            ranks[j] = r
        offset += rows
    return {"a": a, "b": b, "ranks": ranks}


def _shard(
    p: ProjectionSlots, full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s share: row-parallel keeps its input columns of a, column-parallel its output columns
    of b (b's last dimension)."""
    if tp == 1:
        return full
    if p.projection in ROW_PARALLEL:
        share = p.in_features // tp
        return {**full, "a": full["a"][:, rank * share : (rank + 1) * share].contiguous()}
    return {**full, "b": full["b"].index_select(1, column_rows(cfg, tp, rank, p.projection))}

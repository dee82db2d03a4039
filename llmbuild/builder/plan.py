"""`llmbuild plan`: validate a recipe against its checkpoint and size the engine, without building."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmbuild.builder.calibration import calibration_path
from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.models.llama import linear_shapes
from llmbuild.builder.quantize import check_group_fit, excluded, quantized_bytes
from llmbuild.builder.support import check_supported
from llmbuild.errors import RecipeError
from llmbuild.memory_plan import MemoryPlan, available_memory_bytes, plan_memory
from llmbuild.model_config import DTYPES, KV_CACHE_DTYPES, ModelConfig
from llmbuild.recipe import QuantizationSection, Recipe
from llmbuild.tensor_parallel import rank_config, split_problems


@dataclass(frozen=True)
class BuildPlan:
    """A recipe resolved against its checkpoint: dtypes, sizes and the KV-cache plan."""

    recipe: Recipe
    checkpoint: Checkpoint
    dtype: str
    kv_cache_dtype: str
    memory: MemoryPlan
    available_bytes: int


def weight_bytes(cfg: ModelConfig, quantization: QuantizationSection, itemsize: int) -> int:
    """Bytes of the engine's weights: parameters in the model dtype, quantized projections in their
    format (checked to fit it: a misfit fails the plan, not the build)."""
    total = cfg.num_params * itemsize
    if quantization.weights in ("int8", "int4", "fp8"):
        chosen = {name: nk for name, nk in linear_shapes(cfg).items() if not excluded(name, quantization)}
        check_group_fit({name: k for name, (_, k) in chosen.items()}, quantization)
        for n, k in chosen.values():
            total += quantized_bytes(n, k, quantization, itemsize) - n * k * itemsize
    if quantization.kv_cache in ("int8", "fp8"):  # fp32 K and V scales per kv head and layer
        total += cfg.num_layers * 2 * cfg.num_kv_heads * 4
    return total


def make_plan(recipe: Recipe, available_bytes: int | None = None) -> BuildPlan:
    """Open the checkpoint (config only), check the recipe fits it, and size weights and KV cache."""
    check_supported(recipe)
    ckpt = Checkpoint.open(recipe.checkpoint_dir())
    cfg = ckpt.config
    limits = recipe.limits
    if limits.max_seq_len > cfg.max_position_embeddings:
        raise RecipeError(
            f"limits.max_seq_len ({limits.max_seq_len}) exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}); lower it to at most {cfg.max_position_embeddings}"
        )
    if ckpt.sliding_window is not None and ckpt.sliding_window < limits.max_seq_len:
        raise RecipeError(
            f"not supported yet: sliding-window attention (window {ckpt.sliding_window} < limits.max_seq_len "
            f"{limits.max_seq_len}); set limits.max_seq_len <= {ckpt.sliding_window}"
        )
    tp = recipe.target.tensor_parallel
    problems = split_problems(cfg, tp)
    if problems:
        raise RecipeError(
            f"target.tensor_parallel={tp} cannot split this model: {'; '.join(problems)}; "
            "choose a tensor_parallel that divides the head counts and intermediate_size"
        )
    rank_cfg = rank_config(cfg, tp)
    q = recipe.quantization
    if q.calibrated:
        calibration_path(q.calibration_or_default(), recipe.base_dir())  # a missing text fails the plan, not the build
    dtype = ckpt.dtype if recipe.model.dtype == "auto" else recipe.model.dtype
    kv_dtype = dtype if recipe.quantization.kv_cache == "auto" else recipe.quantization.kv_cache
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    available = available_bytes if available_bytes is not None else available_memory_bytes()
    try:
        rank_weight_bytes = weight_bytes(rank_cfg, q, itemsize)
    except RecipeError as exc:
        if tp == 1:
            raise
        raise RecipeError(f"with target.tensor_parallel={tp}, {exc} (input sizes are per rank)") from None
    # every rank of an engine runs on this machine: the plan sums them (replicated tensors count per rank)
    memory = plan_memory(
        weight_bytes=tp * rank_weight_bytes,
        kv_bytes_per_token=tp * rank_cfg.kv_bytes_per_token(KV_CACHE_DTYPES[kv_dtype]),
        limits=limits,
        kv_cache=recipe.kv_cache,
        available_bytes=available,
    )
    return BuildPlan(recipe, ckpt, dtype, kv_dtype, memory, available)

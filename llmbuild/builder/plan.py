"""`llmbuild plan`: validate a recipe against its checkpoint and size the engine, without building.

Limits the recipe leaves unset come from the checkpoint here (as vLLM derives max_model_len): the plan,
the build and the manifest all use the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmbuild.builder.calibration import calibration_path
from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.draft import DRAFT_KEY, check_draft_checkpoint, draft_problem, draft_recipe, draft_section
from llmbuild.builder.models.llama import linear_shapes
from llmbuild.builder.quantize import check_group_fit, excluded, quantized_bytes
from llmbuild.builder.support import check_supported, unsupported_features
from llmbuild.errors import CheckpointError, RecipeError
from llmbuild.lora_layout import buffer_bytes
from llmbuild.memory_plan import (
    GPU_OVERHEAD_BYTES,
    HOST_OVERHEAD_BYTES,
    MemoryPlan,
    available_memory_bytes,
    format_bytes,
    largest_step_tokens,
    plan_memory,
    step_activation_bytes,
)
from llmbuild.model_config import DTYPES, KV_CACHE_DTYPES, ModelConfig
from llmbuild.recipe import EngineLimits, LimitsSection, QuantizationSection, Recipe
from llmbuild.tensor_parallel import rank_config, split_problems

DEFAULT_MAX_SEQ_LEN = 4096
"""Cap on the max_seq_len a recipe leaves unset (else the model's max_position_embeddings): the default KV
cache holds max_batch_size full sequences, and 8 x 4096 tokens of an 8B-class GQA model are already 4 GiB
in bf16, half its weights; a 128k-position model would need 128 GiB. Set limits.max_seq_len for more."""


@dataclass(frozen=True)
class BuildPlan:
    """A recipe resolved against its checkpoint: dtypes, limits, sizes and the memory plan."""

    recipe: Recipe
    """The recipe with its limits resolved (what the engine records)."""
    checkpoint: Checkpoint
    dtype: str
    kv_cache_dtype: str
    memory: MemoryPlan
    available_bytes: int
    """The memory the engine must fit: host RAM for a cpu recipe, one GPU's memory for a cuda one."""
    lora_bytes: int = 0
    """Of the weights, the LoRA slot buffers (every rank's; allocated at load, not in the weights files)."""
    draft: BuildPlan | None = None
    """The plan of the draft engine built with this one (speculative.draft), sized against the same memory."""

    @property
    def limits(self) -> EngineLimits:
        """The recipe's limits, resolved against the checkpoint."""
        limits = self.recipe.limits
        assert isinstance(limits, EngineLimits), "make_plan resolves the limits"
        return limits

    @property
    def draft_bytes(self) -> int:
        """The draft's weights and KV cache (0: no draft). It runs in the target's process between the target's
        steps, so its activations and fixed overhead are counted once, as the target's."""
        return self.draft.memory.total_bytes if self.draft is not None else 0

    @property
    def required_bytes(self) -> int:
        """Memory the running engine needs: its own (MemoryPlan.required_bytes) and its draft's."""
        return self.memory.required_bytes + self.draft_bytes

    def shortfall(self) -> str | None:
        """Why the engine does not fit available_bytes (one line with the breakdown and the fix), or None."""
        if self.required_bytes <= self.available_bytes:
            return None
        where = "of GPU memory" if self.recipe.target.device == "cuda" else ""
        return (
            f"engine {self.recipe.name} needs {format_bytes(self.required_bytes)} ({memory_breakdown(self)}), "
            f"{format_bytes(self.available_bytes)} {where + ' ' if where else ''}available: short by "
            f"{format_bytes(self.required_bytes - self.available_bytes)}; lower limits.max_batch_size / max_seq_len "
            "or quantize"
        )


def memory_breakdown(plan: BuildPlan) -> str:
    """'weights W + KV cache K for limits ... + activations A of the largest step (T tokens) + overhead O'
    (+ 'draft D (weights + KV cache)' with a built-in draft)."""
    m, limits = plan.memory, plan.limits
    draft = f" + draft {format_bytes(plan.draft_bytes)} (weights + KV cache)" if plan.draft is not None else ""
    return (
        f"weights {format_bytes(m.weight_bytes)} + KV cache {format_bytes(m.total_bytes - m.weight_bytes)} for "
        f"limits max_batch_size {limits.max_batch_size} x max_seq_len {limits.max_seq_len} + activations "
        f"{format_bytes(m.activation_bytes)} of the largest step ({largest_step_tokens(limits)} tokens) + "
        f"overhead {format_bytes(m.overhead_bytes)}{draft}"
    )


def resolve_limits(limits: LimitsSection, cfg: ModelConfig, sliding_window: int | None) -> EngineLimits:
    """The recipe's limits with max_seq_len filled from the model when unset: its max_position_embeddings
    (within a sliding window, which this version cannot run past), at most DEFAULT_MAX_SEQ_LEN. An explicit
    value the model cannot take fails."""
    fields = limits.model_dump()
    if limits.max_seq_len is None:
        fields["max_seq_len"] = min(
            cfg.max_position_embeddings, sliding_window or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN
        )
    resolved = EngineLimits(**fields)
    if resolved.max_seq_len > cfg.max_position_embeddings:
        raise RecipeError(
            f"limits.max_seq_len ({resolved.max_seq_len}) exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}); lower it to at most {cfg.max_position_embeddings}"
        )
    if sliding_window is not None and sliding_window < resolved.max_seq_len:
        raise RecipeError(
            f"not supported yet: sliding-window attention (window {sliding_window} < limits.max_seq_len "
            f"{resolved.max_seq_len}); set limits.max_seq_len <= {sliding_window}"
        )
    return resolved


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


def make_plan(recipe: Recipe, available_bytes: int | None = None, build_machine: bool = True) -> BuildPlan:
    """Open the checkpoint (config only), check the recipe fits it, and size the engine against
    `available_bytes` (default: this machine's memory, or its GPU's for a cuda recipe).

    `build_machine=False` sizes a recipe for another machine: a cuda one needs no GPU here.
    """
    if build_machine:
        check_supported(recipe)
    elif missing := unsupported_features(recipe):
        raise RecipeError("not supported yet: " + "; ".join(missing))
    ckpt = Checkpoint.open(recipe.checkpoint_dir())
    cfg = ckpt.config
    limits = resolve_limits(recipe.limits, cfg, ckpt.sliding_window)
    recipe = recipe.model_copy(update={"limits": limits})
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
    device = recipe.target.device
    available = available_bytes if available_bytes is not None else available_memory_bytes(device)
    try:
        rank_weight_bytes = weight_bytes(rank_cfg, q, itemsize)
    except RecipeError as exc:
        if tp == 1:
            raise
        raise RecipeError(f"with target.tensor_parallel={tp}, {exc} (input sizes are per rank)") from None
    lora_bytes = tp * buffer_bytes(rank_cfg, recipe.lora, DTYPES[dtype]) if recipe.lora is not None else 0
    # every rank of an engine runs on this machine: the plan sums them (replicated tensors count per rank)
    memory = plan_memory(
        weight_bytes=tp * rank_weight_bytes + lora_bytes,
        kv_bytes_per_token=tp * rank_cfg.kv_bytes_per_token(KV_CACHE_DTYPES[kv_dtype]),
        limits=limits,
        kv_cache=recipe.kv_cache,
        available_bytes=available,
        activation_bytes=step_activation_bytes(cfg, largest_step_tokens(limits), itemsize, tp),
        # a cpu engine runs one process per rank; a cuda one's host side is not in the GPU's budget
        overhead_bytes=GPU_OVERHEAD_BYTES if device == "cuda" else tp * HOST_OVERHEAD_BYTES,
    )
    draft = _draft_plan(recipe, ckpt, available, build_machine) if draft_section(recipe) is not None else None
    return BuildPlan(recipe, ckpt, dtype, kv_dtype, memory, available, lora_bytes, draft)


def _draft_plan(recipe: Recipe, ckpt: Checkpoint, available: int, build_machine: bool) -> BuildPlan:
    """The plan of the recipe's built-in draft (its limits resolved: the target's), checked to serve the target.

    Sized against the same memory, as the runtime sizes the draft's KV cache (runtime/draft_proposer.py)."""
    draft = draft_recipe(recipe)
    check_draft_checkpoint(draft)
    try:
        plan = make_plan(draft, available, build_machine)
    except (RecipeError, CheckpointError) as exc:
        raise type(exc)(f"{DRAFT_KEY}: {exc}") from None
    problem = draft_problem(recipe, ckpt, plan.recipe, plan.checkpoint)
    if problem:
        raise RecipeError(problem)
    return plan

"""Weight quantization of a model graph: linear layers replaced by quantized ones, in place.

Formats (builder/quant_format.py): int8 with one scale per output row (symmetric), with int8
activations (W8A8) or without, int4 in groups of `group_size` columns (asymmetric: a scale and a
min per group), fp8. Methods: round to nearest (rtn), AWQ (builder/awq.py: activation-aware
per-channel scales and clipping ranges searched on calibration text), GPTQ (builder/gptq.py:
rounding with Hessian-based error compensation) and SmoothQuant (builder/smoothquant.py: W8A8's
activation outliers folded into the weights, then round to nearest).
`exclude` patterns (fnmatch, on our module names such as `layers.0.mlp.down` or `lm_head`) keep
chosen layers in the model dtype; a tied lm_head shares the embedding matrix and always stays in
the model dtype.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from llmbuild.builder.awq import awq_quantize
from llmbuild.builder.gptq import gptq_quantize
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.quant_format import ScaledLinear, grid_of
from llmbuild.builder.smoothquant import smooth_model
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.errors import RecipeError
from llmbuild.plugins.linear_fp8 import quantize_fp8
from llmbuild.recipe import QuantizationSection


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
    model: LlamaModel,
    quantization: QuantizationSection,
    calibration: torch.Tensor | None = None,
    progress: Progress = no_progress,
) -> list[str]:
    """Quantize every nn.Linear not excluded, in place; returns the names of the quantized layers.

    awq, gptq and smoothquant need `calibration`, token windows [num_samples, seq_len]
    (builder/calibration.py), and report the decoder layers done to `progress`.
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
    grids = {name: grid_of(quantization, m.in_features, dtype) for name, m in chosen.items()}
    if quantization.method in ("awq", "gptq"):
        run = awq_quantize if quantization.method == "awq" else gptq_quantize
        replacements = run(model, grids, _windows(calibration, quantization), progress)
    else:
        if quantization.method == "smoothquant":  # folded in place, then rounded to nearest
            alpha = quantization.smoothquant_alpha
            smooth_model(model, _windows(calibration, quantization), alpha, chosen, progress)
        replacements = {name: grids[name].module(m.weight.data, m.bias) for name, m in chosen.items()}
    _replace(model, replacements)
    return list(chosen)


def _windows(calibration: torch.Tensor | None, quantization: QuantizationSection) -> torch.Tensor:
    if calibration is None:
        raise ValueError(f"method={quantization.method} needs calibration token windows")
    return calibration


def _replace(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, new in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)

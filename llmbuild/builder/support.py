"""What this llmbuild can build today. Recipe fields for features still to come are accepted by
the schema and rejected here, by name, so that nothing a user sets is silently ignored."""

from __future__ import annotations

import torch

from llmbuild.errors import RecipeError
from llmbuild.recipe import Recipe


def unsupported_features(recipe: Recipe) -> list[str]:
    """One entry per recipe setting this version cannot build yet."""
    out = []
    if recipe.target.device == "cuda" and recipe.target.tensor_parallel > 1:
        out.append("target.tensor_parallel > 1 with target.device=cuda (tensor-parallel engines are cpu only)")
    q = recipe.quantization
    if not q.quantized and (recipe.quality.max_kl is not None or recipe.quality.min_top1 is not None):
        out.append(
            "quality gate (quality.max_kl / quality.min_top1) without quantization.weights or "
            "quantization.kv_cache: nothing to compare"
        )
    return out


def check_supported(recipe: Recipe) -> None:
    """Raise a RecipeError listing every setting this version cannot build, or naming what this machine lacks."""
    if recipe.target.device == "cuda" and not torch.cuda.is_available():
        # Inductor compiles the Triton kernels for the GPU it finds (its architecture, its CUDA version)
        raise RecipeError(
            "target.device=cuda needs a GPU on the build machine and this one has none (torch.cuda.is_available() "
            "is False); build on the machine that will serve the engine, or use target.device=cpu"
        )
    missing = unsupported_features(recipe)
    if missing:
        raise RecipeError("not supported yet: " + "; ".join(missing))

"""What this llmbuild can build today. Recipe fields for features still to come are accepted by
the schema and rejected here, by name, so that nothing a user sets is silently ignored."""

from __future__ import annotations

from llmbuild.errors import RecipeError
from llmbuild.recipe import Recipe


def unsupported_features(recipe: Recipe) -> list[str]:
    """One entry per recipe setting this version cannot build yet."""
    out = []
    if recipe.target.device != "cpu":
        # the graph retargets to the Triton kernels (builder/retarget.py); compiling and running it on a GPU
        # is not verified yet
        out.append(f"target.device={recipe.target.device} (cpu engines only so far)")
    q = recipe.quantization
    if not q.quantized and (recipe.quality.max_kl is not None or recipe.quality.min_top1 is not None):
        out.append(
            "quality gate (quality.max_kl / quality.min_top1) without quantization.weights or "
            "quantization.kv_cache: nothing to compare"
        )
    return out


def check_supported(recipe: Recipe) -> None:
    """Raise a RecipeError listing every setting this version cannot build."""
    missing = unsupported_features(recipe)
    if missing:
        raise RecipeError("not supported yet: " + "; ".join(missing))

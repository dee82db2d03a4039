"""What this llmbuild can build today. Recipe fields for features still to come are accepted by
the schema and rejected here, by name, so that nothing a user sets is silently ignored."""

from __future__ import annotations

from llmbuild.errors import RecipeError
from llmbuild.machine import gpu_arch
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


def cuda_build_problem(recipe: Recipe, gpu: str | None) -> str | None:
    """Why a cuda recipe cannot be built on a machine whose GPU is `gpu` (sm_XY, None: no GPU), or None.

    Inductor compiles the Triton kernels for the GPU it finds, so the build machine's GPU is the target.
    """
    if gpu is None:
        return (
            "target.device=cuda needs a GPU on the build machine and this one has none (torch.cuda.is_available() "
            "is False); build on the machine that will serve the engine, or use target.device=cpu"
        )
    arch = recipe.target.arch
    if arch not in ("auto", gpu):
        return (
            f"target.arch={arch} but this machine's GPU is {gpu}: kernels are compiled for the GPU the build runs "
            f"on; build on an {arch} machine or set target.arch: auto"
        )
    q = recipe.quantization
    fp8 = [
        f"quantization.{name}=fp8"
        for name, value in (("weights", q.weights), ("kv_cache", q.kv_cache))
        if value == "fp8"
    ]
    if fp8 and int(gpu.removeprefix("sm_")) < 89:
        return (
            f"{' and '.join(fp8)} needs an sm_89 or newer GPU (fp8 tensor cores: Ada, Hopper), this one is {gpu}; "
            "use int8 or int4 weights and an int8 KV cache"
        )
    return None


def check_supported(recipe: Recipe) -> None:
    """Raise a RecipeError listing every setting this version cannot build, or naming what this machine lacks."""
    if recipe.target.device == "cuda":
        reason = cuda_build_problem(recipe, gpu_arch())
        if reason:
            raise RecipeError(reason)
    missing = unsupported_features(recipe)
    if missing:
        raise RecipeError("not supported yet: " + "; ".join(missing))

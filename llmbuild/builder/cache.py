"""The build cache: outputs of expensive stages, keyed by exactly what they depend on.

    <cache>/builds/graph/<config hash>/{model,exported}.pt2      export + AOTInductor compile
    <cache>/builds/weights/<weights key>/rank<r>.safetensors     checkpoint -> engine dtype, per rank
    <cache>/builds/weights/<weights key>/quality-<isa>.json      the quality gate's metrics of those weights

The compiled graph never depends on weight values (they stay outside the .so), so a new checkpoint
of the same architecture reuses it; the weights never depend on the target, so a new target reuses
them. Entries are written atomically and never modified; delete the directory to reclaim space.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import llmbuild
from llmbuild.builder.compile import INDUCTOR_CONFIGS
from llmbuild.builder.plan import BuildPlan
from llmbuild.builder.quality import EVAL_VERSION
from llmbuild.manifest import GRAPH_INPUTS, Inputs, Target, sha256_json
from llmbuild.plugins import OP_VERSIONS
from llmbuild.recipe import Recipe

QUALITY = "quality-{isa}.json"
"""The cached quality metrics of a build's weights, per kernel tier the gate ran (tiers differ in summation order)."""


class BuildCache:
    """Stage outputs under `<root>/builds/<kind>/<key>/`."""

    def __init__(self, root: Path, read: bool = True) -> None:
        self.root = root / "builds"
        self.read = read
        """False (--no-cache): every stage runs; its outputs still refresh the cache."""

    def lookup(self, kind: str, key: str, name: str) -> Path | None:
        """The cached file, or None when absent or reading is disabled."""
        path = self.root / kind / key / name
        return path if self.read and path.is_file() else None

    def store(self, kind: str, key: str, src: Path, name: str | None = None) -> None:
        """Copy src into the cache under (kind, key) as `name` (default: its own name), atomically."""
        name = name or src.name
        target = self.root / kind / key / name
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)  # readers see the whole file or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def store_json(self, kind: str, key: str, name: str, data: dict[str, Any]) -> None:
        """Store `data` as the JSON file `name` under (kind, key)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=1) + "\n")
            self.store(kind, key, path)


def weights_key(recipe: Recipe, plan: BuildPlan, inputs: Inputs) -> str:
    """What the engine's weights files depend on: checkpoint bytes, dtype, quantization, RoPE table
    length, rank count."""
    return sha256_json(
        {
            "llmbuild": llmbuild.__version__,
            "checkpoint": inputs.checkpoint_sha256,
            "dtype": plan.dtype,
            "quantization": recipe.quantization.model_dump(mode="json"),
            "calibration_text": inputs.calibration_sha256,
            "max_seq_len": recipe.limits.max_seq_len,
            "tensor_parallel": recipe.target.tensor_parallel,
            "quality_eval": EVAL_VERSION,  # the cached quality metrics live beside the weights
        }
    )


def config_hash(recipe: Recipe, plan: BuildPlan, target: Target) -> str:
    """Hash of exactly what changes the built artifact (serve defaults and KV budget excluded): the
    graph's cache key, and the manifest's config_hash."""
    return sha256_json(
        {
            "llmbuild": llmbuild.__version__,
            "torch": torch.__version__,
            "target": target.model_dump(mode="json"),
            "model": plan.checkpoint.config.model_dump(mode="json"),
            "dtype": plan.dtype,
            "kv_cache_dtype": plan.kv_cache_dtype,
            "limits": recipe.limits.model_dump(mode="json"),
            "block_size": recipe.kv_cache.block_size,
            # the graph depends on which layers are quantized to what, not on how the values were found
            "quantization": recipe.quantization.model_dump(
                mode="json", include={"weights", "activations", "group_size", "exclude"}
            ),
            "plugins": OP_VERSIONS,
            "graph_options": recipe.plugins.model_dump(mode="json"),
            "lora": recipe.lora.model_dump(mode="json") if recipe.lora else None,
            "graph_inputs": GRAPH_INPUTS,
            "inductor": INDUCTOR_CONFIGS,
        }
    )

"""Engine: a built engine directory, checked against this machine and loaded for one rank.

The runtime needs only the op library (plugins/) to run an engine, never the builder's model code, and
loads the library's compiled code from the engine itself (no compiler on a serving machine).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from llmbuild.cpu_target import fitting_level
from llmbuild.errors import EngineError
from llmbuild.lora_layout import allocate_buffers
from llmbuild.machine import cpu_flags, gpu_arch
from llmbuild.manifest import (
    EXPORTED,
    GRAPH,
    GRAPH_INPUTS,
    OP_LIBRARY,
    RECIPE,
    TOKENIZER_DIR,
    Manifest,
    Target,
    rank_dir,
    verify_files,
)
from llmbuild.model_config import DTYPES, KV_CACHE_DTYPES
from llmbuild.plugins import OP_VERSIONS, load_plugins
from llmbuild.runtime.graph import Graph, load_graph
from llmbuild.tensor_parallel import rank_config


def target_mismatch(manifest: Manifest, backend: str | None = None) -> str | None:
    """Why this machine cannot run the engine (with `backend`, default the engine's), or None if it can."""
    target = manifest.target
    backend = backend or target.backend
    if backend == "compiled" and target.backend != "compiled":
        return "engine has no compiled package (it was built with target.backend=eager); run it with backend eager"
    if manifest.torch_version != torch.__version__:
        return (
            f"engine was built with torch {manifest.torch_version}, this runtime has torch {torch.__version__}; "
            f"rebuild the engine or install torch=={manifest.torch_version.split('+')[0]}"
        )
    if target.machine != platform.machine():
        return f"engine targets {target.machine} CPUs, this machine is {platform.machine()}; rebuild it here"
    if target.device == "cuda":
        reason = gpu_mismatch(target, gpu_arch(), torch.version.cuda)
        if reason:
            return reason
    reason = cpu_mismatch(target, cpu_flags())
    if reason:
        return reason
    for op, version in manifest.plugins.items():
        have = OP_VERSIONS.get(op)
        if have != version:
            now = f"version {have}" if have is not None else "no such op"
            return f"engine was built against plugin {op} version {version}, this runtime has {now}; rebuild the engine"
    return None


def cpu_mismatch(target: Target, flags: frozenset[str]) -> str | None:
    """Why a CPU with these /proc/cpuinfo flags cannot run code compiled for the engine's target.cpu (None: it can)."""
    missing = sorted(set(target.required_isa) - flags)
    if not missing:
        return None
    fits = fitting_level(flags) if target.machine == "x86_64" else "native"
    return (
        f"engine was compiled for target.cpu={target.cpu} ({target.cpu_resolved}), which needs CPU features this "
        f"machine lacks: {', '.join(missing)}; rebuild it with target.cpu: {fits} (runs here) or native"
    )


def gpu_mismatch(target: Target, arch: str | None, cuda_version: str | None) -> str | None:
    """Why a cuda engine cannot run on a GPU of `arch` under a torch built for `cuda_version` (None: it can).

    Compiled kernels (cubins) run only on the architecture they were built for.
    """
    if arch is None:
        return "engine targets cuda but no GPU is available here; build a cpu engine for this machine"
    if target.arch != arch:
        return f"engine was built for {target.arch} GPUs, this GPU is {arch}; rebuild it with target.arch={arch}"
    if target.cuda_version != cuda_version:
        return (
            f"engine was built with CUDA {target.cuda_version}, this runtime's torch has CUDA {cuda_version}; "
            "rebuild the engine or install the torch build it was made with"
        )
    return None


@dataclass(frozen=True)
class Engine:
    """A loaded engine rank: its manifest and the step graph with weights attached."""

    path: Path
    manifest: Manifest
    rank: int
    backend: str
    graph: Graph
    lora_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """The graph's LoRA slot buffers (lora_layout.py), written in place as adapters come and go."""

    @classmethod
    def load(cls, path: str | Path, rank: int = 0, verify: bool = True, backend: str | None = None) -> Engine:
        """Check the manifest and target, verify this rank's file hashes, and load the graph + weights.

        `backend` overrides the engine's: 'eager' runs a compiled engine's exported program (debugging).
        """
        path = Path(path)
        manifest = Manifest.load(path)
        backend = backend or manifest.target.backend
        reason = target_mismatch(manifest, backend)
        if reason:
            raise EngineError(f"{path}: {reason}")
        if not 0 <= rank < manifest.target.tensor_parallel:
            raise EngineError(f"{path}: engine has ranks 0..{manifest.target.tensor_parallel - 1}, not rank {rank}")
        graph_file = f"{rank_dir(rank)}/{GRAPH if backend == 'compiled' else EXPORTED}"
        if graph_file not in manifest.files:
            kind = "compiled package" if backend == "compiled" else "exported program"
            raise EngineError(f"{path}: manifest lists no {kind} {graph_file}; rebuild the engine")
        if verify:
            verify_files(path, manifest, only=(rank_dir(rank), TOKENIZER_DIR, RECIPE, OP_LIBRARY))
        if OP_LIBRARY not in manifest.files:
            raise EngineError(f"{path}: manifest lists no op library {OP_LIBRARY}; rebuild the engine")
        if manifest.graph_inputs != GRAPH_INPUTS:
            raise EngineError(
                f"{path}: the engine's graph takes the step inputs of llmbuild {manifest.llmbuild_version} "
                f"({', '.join(manifest.graph_inputs)}), not this llmbuild's; rebuild the engine"
            )
        load_plugins(path / OP_LIBRARY)
        lora_buffers = {}
        if manifest.lora is not None:
            cfg = rank_config(manifest.model, manifest.target.tensor_parallel)
            lora_buffers = allocate_buffers(cfg, manifest.lora, DTYPES[manifest.dtype], manifest.target.device)
        graph = load_graph(path / rank_dir(rank), backend, manifest.target.device, lora_buffers)
        return cls(path, manifest, rank, backend, graph, lora_buffers)

    @property
    def device(self) -> torch.device:
        """Where the weights live and the graph runs: the cpu, or the first GPU for a cuda engine."""
        return torch.device(self.manifest.target.device)

    @cached_property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.dtype]

    @cached_property
    def kv_cache_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.manifest.kv_cache_dtype]

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.graph.weights.values())

    def load_tokenizer(self):  # -> transformers.PreTrainedTokenizerBase
        """The engine's own tokenizer (with its chat template), loaded offline."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path / TOKENIZER_DIR), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
            raise EngineError(f"{self.path}: tokenizer does not load ({exc})") from None

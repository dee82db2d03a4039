"""The engine graph of one rank, behind one call signature for both backends.

    graph(inputs, kv_caches) -> logits      inputs: manifest.GRAPH_INPUTS without the caches

`eager` runs the exported program op by op (every engine has one); `compiled` runs the AOTInductor
package (compiled engines only).
Either way the weights come from the rank's safetensors file, outside the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError

from llmbuild.errors import EngineError
from llmbuild.manifest import EXPORTED, GRAPH, WEIGHTS
from llmbuild.runtime.weights import load_weights


class Graph(Protocol):
    weights: dict[str, torch.Tensor]

    def __call__(self, inputs: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor]) -> torch.Tensor: ...


class EagerGraph:
    """An exported program with the engine's weights assigned to it."""

    def __init__(self, rank_path: Path, weights: dict[str, torch.Tensor]) -> None:
        try:
            program = torch.export.load(rank_path / EXPORTED)
        except Exception as exc:  # noqa: BLE001 - the archive reader raises many types
            raise EngineError(f"{rank_path / EXPORTED}: cannot load the engine graph ({exc})") from None
        self.module = program.module()
        try:
            self.module.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as exc:
            raise EngineError(
                f"{rank_path / WEIGHTS}: weights do not fit the graph ({str(exc).splitlines()[0]})"
            ) from None
        self.weights = weights

    def __call__(self, inputs: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor]) -> torch.Tensor:
        return self.module(*inputs, kv_caches)


class CompiledGraph:
    """An AOTInductor package; the weights are handed over without a copy (user-managed constants)."""

    def __init__(self, rank_path: Path, weights: dict[str, torch.Tensor]) -> None:
        try:
            package = torch._inductor.aoti_load_package(str(rank_path / GRAPH))
        except Exception as exc:  # noqa: BLE001 - the package loader raises many types
            raise EngineError(f"{rank_path / GRAPH}: cannot load the compiled engine ({exc})") from None
        names = package.get_constant_fqns()
        missing = sorted(set(names) - set(weights))
        if missing:
            raise EngineError(f"{rank_path / WEIGHTS}: weights do not fit the graph (missing {missing[0]})")
        package.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
        self._run = package.loader.boxed_run  # skips the pytree round trip of package.__call__
        self.weights = weights  # user-managed: the package reads these tensors, keep them alive

    def __call__(self, inputs: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._run([*inputs, *kv_caches])[0]


def load_graph(rank_path: Path, backend: str, device: str = "cpu") -> Graph:
    """Load a rank's weights onto `device` and its graph for `backend` ('eager' or 'compiled')."""
    try:
        weights = load_weights(rank_path / WEIGHTS, device)
    except (SafetensorError, OSError) as exc:
        raise EngineError(f"{rank_path / WEIGHTS}: cannot read weights ({str(exc).splitlines()[0]})") from None
    return CompiledGraph(rank_path, weights) if backend == "compiled" else EagerGraph(rank_path, weights)

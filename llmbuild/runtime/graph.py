"""The engine graph of one rank, behind one call signature for both backends.

    graph(inputs, kv_caches) -> logits      inputs: StepInputs.as_tuple() (manifest.GRAPH_INPUTS, caches excluded)

`eager` runs the exported program op by op (every engine has one); `compiled` runs the AOTInductor
package (compiled engines only).
Either way the weights come from the rank's safetensors file, outside the graph.

NOTE: an AOTInductor package reads each input as a dense tensor of the dtype it was traced with: a
strided or offset view (a column of a batch, a slice) is read as if it were contiguous, silently giving
another step (issue 27). Both backends therefore take their inputs through `dense_inputs`, which copies
only what is not already a dense tensor of the right dtype (the runtime's own inputs never are: the check
costs under a microsecond per input). The KV caches are written in place, so a cache that is not dense
is refused instead of copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError

from llmbuild.errors import EngineError
from llmbuild.manifest import EXPORTED, GRAPH, WEIGHTS
from llmbuild.runtime.step_inputs import INPUT_NAMES, INPUT_SPECS
from llmbuild.runtime.weights import load_weights

_DTYPES = tuple(s.dtype for s in INPUT_SPECS)
"""The dtype of each step input, as the graph was traced."""


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.storage_offset() == 0


def dense_inputs(inputs: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's inputs and caches as the graph must read them: each input contiguous, at offset 0,
    in its traced dtype (copied only if not already); caches checked, never copied (they are written)."""
    if len(inputs) != len(_DTYPES):
        raise ValueError(f"the engine graph takes {len(_DTYPES)} step inputs ({', '.join(INPUT_NAMES)})")
    out = [
        t if t.dtype == d and _dense(t) else t.to(dtype=d, memory_format=torch.contiguous_format, copy=True)
        for t, d in zip(inputs, _DTYPES, strict=True)
    ]
    for i, cache in enumerate(kv_caches):
        if not _dense(cache):
            raise ValueError(f"KV cache {i} is a strided or offset view: pass each layer's own cache tensor")
    return out + list(kv_caches)


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
        step, n = dense_inputs(inputs, kv_caches), len(inputs)
        return self.module(*step[:n], step[n:])


class CompiledGraph:
    """An AOTInductor package; the weights are handed over without a copy (user-managed constants).

    `single_threaded` runs it without the container's thread synchronization, which CUDA graph capture
    needs: the threaded run records a CUDA event per call and, on the next call, queries or waits on it
    to reuse its one model instance, and neither is allowed while a stream is being captured.
    """

    def __init__(self, rank_path: Path, weights: dict[str, torch.Tensor], single_threaded: bool = False) -> None:
        try:
            package = torch._inductor.aoti_load_package(str(rank_path / GRAPH), run_single_threaded=single_threaded)
        except Exception as exc:  # noqa: BLE001 - the package loader raises many types
            raise EngineError(f"{rank_path / GRAPH}: cannot load the compiled engine ({exc})") from None
        names = package.get_constant_fqns()
        missing = sorted(set(names) - set(weights))
        if missing:
            raise EngineError(f"{rank_path / WEIGHTS}: weights do not fit the graph (missing {missing[0]})")
        # a weight the package does not take was compiled into its code: it would compute with those values
        baked = sorted(set(weights) - set(names))
        if baked:
            raise EngineError(
                f"{rank_path / GRAPH}: the compiled package holds {baked[0]} in its code instead of taking it from "
                f"the weights (built by an older llmbuild); rebuild the engine"
            )
        package.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
        self._run = package.loader.boxed_run  # skips the pytree round trip of package.__call__
        self.weights = weights  # user-managed: the package reads these tensors, keep them alive

    def __call__(self, inputs: tuple[torch.Tensor, ...], kv_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._run(dense_inputs(inputs, kv_caches))[0]


def load_graph(
    rank_path: Path, backend: str, device: str = "cpu", buffers: dict[str, torch.Tensor] | None = None
) -> Graph:
    """Load a rank's weights onto `device` and its graph for `backend` ('eager' or 'compiled').

    `buffers` are graph constants that the weights file does not hold (LoRA slots, lora_layout.py): the
    graph reads these very tensors, so writing into them later changes what it computes."""
    try:
        weights = load_weights(rank_path / WEIGHTS, device)
    except (SafetensorError, OSError) as exc:
        raise EngineError(f"{rank_path / WEIGHTS}: cannot read weights ({str(exc).splitlines()[0]})") from None
    weights.update(buffers or {})
    if backend == "compiled":
        return CompiledGraph(rank_path, weights, single_threaded=device != "cpu")  # cuda: graphs are captured
    return EagerGraph(rank_path, weights)

"""StepInputs: one packed step's inputs to the engine graph, by name (manifest.GRAPH_INPUTS, caches excluded).

The graph itself takes them positionally, `graph(*inputs.as_tuple(), kv_caches)`, in GRAPH_INPUTS
order: that signature is the engine format and does not change. Each field declares its dtype (as
the graph was traced) and its shape in the step's sizes, and everything that handles the inputs as
a whole derives from those declarations: the dtypes the graph checks (runtime/graph.py), the
dynamic shapes of the export (builder/export.py), the empty capture buffers (runtime/cuda_graphs.py)
and the broadcast to tensor-parallel workers (runtime/rank_workers.py). A new input is a new field
here (and its name in GRAPH_INPUTS); whatever must then give it a value builds StepInputs by name and
fails on the missing field: ModelRunner.prepare, pad_decode_step and the export's example step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch


class StepDim(enum.Enum):
    """A size a step input's shape is made of."""

    TOKENS = "tokens"
    """T: the step's new tokens, all sequences packed back to back."""
    SEQS = "seqs"
    """B: the step's sequences."""
    SEQS_PLUS_ONE = "seqs + 1"
    """B + 1: boundaries of the sequences in the packed step."""
    ROWS = "logit_rows"
    """N: the packed positions whose logits the step returns."""
    TABLE = "max_blocks_per_seq"
    """Block-table columns: fixed per engine (max_seq_len / block_size)."""


@dataclass(frozen=True, slots=True)
class StepShape:
    """The sizes of one step (header of a tensor-parallel step broadcast)."""

    tokens: int
    seqs: int
    rows: int
    table_width: int

    def size(self, dim: StepDim) -> int:
        """The length of dimension `dim` in this step."""
        if dim is StepDim.TOKENS:
            return self.tokens
        if dim is StepDim.SEQS:
            return self.seqs
        if dim is StepDim.SEQS_PLUS_ONE:
            return self.seqs + 1
        if dim is StepDim.ROWS:
            return self.rows
        return self.table_width

    def sizes(self, dims: tuple[StepDim, ...]) -> tuple[int, ...]:
        """The shape of an input whose dimensions are `dims`."""
        return tuple(self.size(d) for d in dims)


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What the graph expects of one step input."""

    name: str
    dtype: torch.dtype
    dims: tuple[StepDim, ...]


def _input(dtype: torch.dtype, *dims: StepDim) -> Any:
    return field(metadata={"dtype": dtype, "dims": dims})


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step's graph inputs (fields in manifest.GRAPH_INPUTS order; tests/runtime/test_step_inputs.py)."""

    input_ids: torch.Tensor = _input(torch.int64, StepDim.TOKENS)
    """The step's tokens, all sequences packed back to back."""
    positions: torch.Tensor = _input(torch.int64, StepDim.TOKENS)
    """Position of each token in its sequence."""
    slot_mapping: torch.Tensor = _input(torch.int64, StepDim.TOKENS)
    """KV-cache slot (block * block_size + offset) each token writes."""
    block_tables: torch.Tensor = _input(torch.int32, StepDim.SEQS, StepDim.TABLE)
    """Cache blocks of each sequence (unused columns 0)."""
    seq_lens: torch.Tensor = _input(torch.int32, StepDim.SEQS)
    """Tokens in the cache of each sequence after this step."""
    cu_seqlens_q: torch.Tensor = _input(torch.int32, StepDim.SEQS_PLUS_ONE)
    """Start of each sequence's tokens in the packed step."""
    logits_indices: torch.Tensor = _input(torch.int64, StepDim.ROWS)
    """Packed positions whose logits the step returns."""
    lora_slots: torch.Tensor = _input(torch.int32, StepDim.TOKENS)
    """Adapter slot of each token (0: the base weights; every token 0 in an engine without `lora`)."""

    @classmethod
    def from_lists(cls, pin_memory: bool = False, **values: list) -> StepInputs:
        """Inputs from Python lists, each in its traced dtype; `pin_memory` (cuda only) allocates them
        in page-locked memory, from which a copy to the GPU can be asynchronous."""
        if set(values) != set(INPUT_NAMES):
            raise TypeError(f"step inputs are {', '.join(INPUT_NAMES)}; got {', '.join(values)}")
        return cls(**{s.name: torch.tensor(values[s.name], dtype=s.dtype, pin_memory=pin_memory) for s in INPUT_SPECS})

    @classmethod
    def empty(cls, table_width: int) -> StepInputs:
        """A step of no sequences (cu_seqlens_q holds its one boundary)."""
        return cls.from_shape(StepShape(0, 0, 0, table_width), torch.zeros)

    @classmethod
    def from_shape(cls, shape: StepShape, make: Callable[..., torch.Tensor] = torch.empty) -> StepInputs:
        """Inputs of `shape`, each made by `make(size, dtype=...)` (torch.empty, torch.zeros)."""
        return cls(*(make(shape.sizes(s.dims), dtype=s.dtype) for s in INPUT_SPECS))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """The graph's positional step arguments (the KV caches follow them)."""
        return tuple(getattr(self, name) for name in INPUT_NAMES)

    def shape(self) -> StepShape:
        """The step's sizes, read off its inputs."""
        return StepShape(
            tokens=self.input_ids.shape[0],
            seqs=self.seq_lens.shape[0],
            rows=self.logits_indices.shape[0],
            table_width=self.block_tables.shape[1],
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> StepInputs:
        """These inputs on `device` (`non_blocking`: only from pinned memory, see ModelRunner._step)."""
        return StepInputs(*(t.to(device, non_blocking=non_blocking) for t in self.as_tuple()))

    def pin_memory(self) -> StepInputs:
        """A copy in page-locked memory (cuda only)."""
        return StepInputs(*(t.pin_memory() for t in self.as_tuple()))

    def copy_to(self, buffers: StepInputs, non_blocking: bool = False) -> None:
        """Write these inputs into `buffers` of the same shapes (a captured graph's static inputs)."""
        for value, buffer in zip(self.as_tuple(), buffers.as_tuple(), strict=True):
            buffer.copy_(value, non_blocking=non_blocking)

    def flatten(self) -> torch.Tensor:
        """All inputs in one int64 tensor (the payload of a tensor-parallel step broadcast)."""
        return torch.cat([t.flatten().long() for t in self.as_tuple()])

    @staticmethod
    def flat_size(shape: StepShape) -> int:
        """The number of elements `flatten` gives for a step of `shape`."""
        return sum(math.prod(shape.sizes(s.dims)) for s in INPUT_SPECS)

    @classmethod
    def unflatten(cls, payload: torch.Tensor, shape: StepShape) -> StepInputs:
        """The inverse of flatten, given the step's shape.

        NOTE: fresh tensors, not views into the payload: compiled graphs assume aligned input storage.
        """
        sizes = [shape.sizes(s.dims) for s in INPUT_SPECS]
        pieces = payload.split([math.prod(size) for size in sizes])
        return cls(
            *(
                piece.reshape(size).to(s.dtype, copy=True)
                for piece, size, s in zip(pieces, sizes, INPUT_SPECS, strict=True)
            )
        )


INPUT_SPECS = tuple(InputSpec(f.name, f.metadata["dtype"], f.metadata["dims"]) for f in fields(StepInputs))
"""Name, traced dtype and shape of each step input, in the graph's order."""
INPUT_NAMES = tuple(s.name for s in INPUT_SPECS)

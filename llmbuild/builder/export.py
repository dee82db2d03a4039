"""torch.export of a model graph with dynamic step shapes, saved without its weights."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from llmbuild.builder.models.llama import LlamaModel
from llmbuild.recipe import EngineLimits
from llmbuild.runtime.step_inputs import INPUT_SPECS, StepDim, StepInputs

# Example sizes for tracing: distinct and >= 2 so that no dimension is specialised or unified.
_T, _B, _N, _BLOCKS = 7, 3, 5, 11


def example_step(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_seq_len: int,
    kv_dtype: torch.dtype,
) -> tuple:
    """A small, valid packed step: the graph's positional arguments (StepInputs, then the KV caches)."""
    max_blocks = math.ceil(max_seq_len / block_size)
    kv = [torch.zeros(_BLOCKS, num_kv_heads, block_size, head_dim, dtype=kv_dtype) for _ in range(2 * num_layers)]
    inputs = StepInputs.from_lists(
        input_ids=[0] * _T,
        positions=[0, 1, 2, 0, 1, 0, 1],
        slot_mapping=[0, 1, 2, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1],
        block_tables=[[b] * max_blocks for b in range(_B)],
        seq_lens=[3, 2, 2],
        cu_seqlens_q=[0, 3, 5, 7],
        logits_indices=[0, 1, 2, 4, 6],
        lora_slots=[0] * _T,
    )
    return (*inputs.as_tuple(), kv)


def export_graph(model: LlamaModel, limits: EngineLimits, block_size: int, kv_dtype: torch.dtype) -> ExportedProgram:
    """Export one packed step (KV caches of `kv_dtype`) with dynamic token, sequence, logit-row and
    cache-block dimensions."""
    cfg = model.cfg
    args = example_step(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, limits.max_seq_len, kv_dtype)
    seqs = Dim("seqs", min=1, max=max(limits.max_batch_size, _B))
    sizes = {
        StepDim.TOKENS: Dim("tokens", min=1, max=max(limits.max_num_tokens, _T)),
        StepDim.SEQS: seqs,
        StepDim.SEQS_PLUS_ONE: seqs + 1,
        StepDim.ROWS: Dim("logit_rows", min=1, max=max(limits.max_num_tokens, _N)),
    }
    # only the first dimension of each input is dynamic (a block table's width is the engine's)
    shapes = (
        *({0: sizes[spec.dims[0]]} for spec in INPUT_SPECS),
        [{0: Dim("cache_blocks", min=1)}] * (2 * cfg.num_layers),
    )
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=shapes, strict=False)


def save_graph(ep: ExportedProgram, path: Path) -> None:
    """Save the program with its weights replaced by one-element placeholders and no example inputs.

    The real weights live in weights.safetensors and are assigned at load; a placeholder keeps the
    shape and dtype (stride 0 over one element), so the archive stays a few hundred KB.
    """
    for name, value in list(ep.state_dict.items()):
        stub = torch.zeros((), dtype=value.dtype).expand(value.shape)
        ep.state_dict[name] = (
            torch.nn.Parameter(stub, requires_grad=False) if isinstance(value, torch.nn.Parameter) else stub
        )
    ep._example_inputs = None
    with warnings.catch_warnings():
        # torch warns that the placeholders share no storage group; they are CPU stubs, replaced at load
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(ep, path)

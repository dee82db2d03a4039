"""CUDA Graphs for decode steps (cuda targets): one graph per bucketed batch size, captured at load.

A decode step of B sequences (one new token each, every one sampling) replays the graph captured
for the smallest bucket >= B (recipe `cuda_graphs.batch_sizes`); larger steps, and steps with
prompt tokens, launch the step graph as usual. The step's inputs go into the graph's static
buffers, padded to the bucket with dummy sequences:

    row        input_id  position  slot_mapping    block_tables row    seq_len  logits row
    0 .. B-1   real      real      real            real                real     real
    B .. N-1   0         0         scratch slot    [scratch, 0, ...]   1        dropped

A dummy row writes its K/V into the scratch block (one block beyond those the block pool hands
out) and attends to that one token, so padding never touches a real sequence's cache.

`DecodeGraphs` captures one graph per bucket at load (largest first, all in one memory pool) and
replays them. The bucket choice, the padding and the captured buffers are tested on CPU against real
engines, with a stand-in capture that re-runs the step on the captured buffers; the CUDA capture
itself runs only on a GPU (bench/gpu_check.sh).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmbuild.runtime.step_inputs import StepInputs


def bucket_for(batch_sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest captured batch size that holds num_seqs sequences; None above the largest."""
    i = bisect.bisect_left(batch_sizes, num_seqs)
    return batch_sizes[i] if i < len(batch_sizes) else None


def is_decode_step(inputs: StepInputs) -> bool:
    """One token per sequence, and every sequence samples (what a captured graph computes)."""
    shape = inputs.shape()
    return shape.tokens == shape.seqs == shape.rows


def pad_decode_step(inputs: StepInputs, bucket: int, scratch_block: int, block_size: int) -> StepInputs:
    """A decode step's inputs padded to `bucket` sequences."""
    n, pad = inputs.input_ids.shape[0], bucket - inputs.input_ids.shape[0]
    if pad < 0 or not is_decode_step(inputs):
        raise ValueError(
            f"cannot pad a step of {n} tokens / {inputs.seq_lens.shape[0]} sequences to a decode bucket {bucket}"
        )
    tables = inputs.block_tables
    dummy_table = torch.zeros(pad, tables.shape[1], dtype=tables.dtype)
    dummy_table[:, 0] = scratch_block
    return StepInputs(
        input_ids=torch.cat([inputs.input_ids, inputs.input_ids.new_zeros(pad)]),
        positions=torch.cat([inputs.positions, inputs.positions.new_zeros(pad)]),
        slot_mapping=torch.cat([inputs.slot_mapping, inputs.slot_mapping.new_full((pad,), scratch_block * block_size)]),
        block_tables=torch.cat([tables, dummy_table]),
        seq_lens=torch.cat([inputs.seq_lens, inputs.seq_lens.new_ones(pad)]),
        cu_seqlens_q=torch.arange(bucket + 1, dtype=inputs.cu_seqlens_q.dtype),  # one token per sequence
        logits_indices=torch.arange(bucket, dtype=inputs.logits_indices.dtype),
        lora_slots=torch.cat([inputs.lora_slots, inputs.lora_slots.new_zeros(pad)]),
    )


Step = Callable[[StepInputs], torch.Tensor]
"""The engine graph on one step's inputs (caches bound): logits [rows, vocab]."""
Capture = Callable[[Step, StepInputs, Any], tuple[Callable[[], None], torch.Tensor, Any]]
"""(step, static inputs, memory pool) -> (replay, static logits, memory pool for the next capture)."""


def capture_cuda_graph(step: Step, static: StepInputs, pool: Any) -> tuple[Callable[[], None], torch.Tensor, Any]:
    """Capture `step` on the buffers `static` as a CUDA graph sharing the memory pool `pool`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)  # warm-up outside the capture: lazy initialisation (cuBLAS handles, autotuned kernels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        logits = step(static)
    return graph.replay, logits, graph.pool()


class DecodeGraphs:
    """One captured decode step per bucket; `replay` runs a step through the smallest that holds it."""

    def __init__(
        self,
        step: Step,
        batch_sizes: Sequence[int],
        max_blocks_per_seq: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        capture: Capture = capture_cuda_graph,
    ) -> None:
        self.batch_sizes = sorted(batch_sizes)
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.pin_memory = device.type == "cuda"  # see ModelRunner.pin_memory
        empty = StepInputs.empty(max_blocks_per_seq)
        self._graphs: dict[int, tuple[Callable[[], None], StepInputs, torch.Tensor]] = {}
        pool = None
        # largest first: the smaller graphs' activations fit in the memory the largest one left in the pool
        for bucket in reversed(self.batch_sizes):
            static = pad_decode_step(empty, bucket, scratch_block, block_size).to(device)
            replay, logits, pool = capture(step, static, pool)
            self._graphs[bucket] = (replay, static, logits)

    def replay(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step's logits from a captured graph (valid until the next replay), or None when no graph
        fits it (a step with prompt tokens, or more sequences than the largest bucket)."""
        num_seqs = inputs.input_ids.shape[0]
        bucket = bucket_for(self.batch_sizes, num_seqs)
        if bucket is None or not is_decode_step(inputs):
            return None
        replay, static, logits = self._graphs[bucket]
        padded = pad_decode_step(inputs, bucket, self.scratch_block, self.block_size)
        if self.pin_memory:
            padded = padded.pin_memory()
        padded.copy_to(static, non_blocking=self.pin_memory)
        replay()
        return logits[:num_seqs]

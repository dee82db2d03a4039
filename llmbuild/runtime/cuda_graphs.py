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

What is here is the bucket choice and the padding, tested on CPU against real engines; the capture
and replay join them with the cuda target (issue 6), where they can be run.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch


def bucket_for(batch_sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest captured batch size that holds num_seqs sequences; None above the largest."""
    i = bisect.bisect_left(batch_sizes, num_seqs)
    return batch_sizes[i] if i < len(batch_sizes) else None


def is_decode_step(inputs: tuple[torch.Tensor, ...]) -> bool:
    """One token per sequence, and every sequence samples (what a captured graph computes)."""
    ids, _, _, _, seq_lens, _, rows = inputs
    return ids.shape[0] == seq_lens.shape[0] == rows.shape[0]


def pad_decode_step(inputs: tuple[torch.Tensor, ...], bucket: int, scratch_block: int, block_size: int) -> tuple:
    """A decode step's inputs (manifest.GRAPH_INPUTS order, caches excluded) padded to `bucket` sequences."""
    ids, positions, slots, tables, seq_lens, cu_seqlens, rows = inputs
    n, pad = ids.shape[0], bucket - ids.shape[0]
    if pad < 0 or not is_decode_step(inputs):
        raise ValueError(f"cannot pad a step of {n} tokens / {seq_lens.shape[0]} sequences to a decode bucket {bucket}")
    dummy_table = torch.zeros(pad, tables.shape[1], dtype=tables.dtype)
    dummy_table[:, 0] = scratch_block
    return (
        torch.cat([ids, ids.new_zeros(pad)]),
        torch.cat([positions, positions.new_zeros(pad)]),
        torch.cat([slots, slots.new_full((pad,), scratch_block * block_size)]),
        torch.cat([tables, dummy_table]),
        torch.cat([seq_lens, seq_lens.new_ones(pad)]),
        torch.arange(bucket + 1, dtype=cu_seqlens.dtype),  # one token per sequence
        torch.arange(bucket, dtype=rows.dtype),
    )

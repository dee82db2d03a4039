"""ModelRunner: holds the KV cache and turns a StepBatch into one call of the engine graph.

The step's sequences are packed back to back without padding (see plugins/paged_attention.py);
only the rows of sequences that sample a token (one more per token a sequence proposes, see
runtime/speculative.py, and one per prompt position a request scores) come back as logits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from llmbuild.runtime.cuda_graphs import Capture, DecodeGraphs, capture_cuda_graph
from llmbuild.runtime.graph import Graph
from llmbuild.runtime.scheduler import StepBatch
from llmbuild.runtime.step_inputs import StepInputs

if TYPE_CHECKING:
    from llmbuild.runtime.rank_workers import RankWorkers

Chunk = tuple[list[int], int, list[int], int]
"""One sequence's share of a packed step: (its tokens, the position of the first, its KV blocks, its LoRA slot)."""


class ModelRunner:
    """Rank 0's runner; with `workers` (a tensor-parallel engine) every step runs on all ranks."""

    def __init__(
        self,
        graph: Graph,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_seq_len: int,
        workers: RankWorkers | None = None,
    ) -> None:
        self.graph = graph
        self.kv_caches = kv_caches
        self.device = kv_caches[0].device
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_seq_len / block_size)
        self.workers = workers
        # NOTE: on cuda the host inputs are page-locked and copied with non_blocking: from pageable
        # memory the copy would be synchronous whatever the flag says. The asynchronous copy is safe
        # because each step's host tensors are fresh and never written after prepare(), and torch's
        # caching host allocator does not reuse a pinned block before the copy that reads it completes.
        self.pin_memory = self.device.type == "cuda"
        self.decode_graphs: DecodeGraphs | None = None

    def capture_decode_graphs(
        self, batch_sizes: tuple[int, ...], scratch_block: int, capture: Capture = capture_cuda_graph
    ) -> None:
        """Capture decode steps of each batch size; padding rows write only into the cache block
        `scratch_block`, which the block pool never hands out."""
        with torch.inference_mode():
            self.decode_graphs = DecodeGraphs(
                self._step, batch_sizes, self.max_blocks_per_seq, scratch_block, self.block_size, self.device, capture
            )

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; returns fp32 logits [rows, vocab]: seq.num_rows per sampling sequence, then one
        per scored prompt position (batch.scoring_seqs), in batch order."""
        inputs, num_rows = self.prepare(batch)
        return self.run(inputs)[:num_rows]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The graph on prepared inputs (on every rank of a tensor-parallel engine); rank 0's logits."""
        with torch.inference_mode():
            if self.decode_graphs is not None:
                logits = self.decode_graphs.replay(inputs)
                if logits is not None:
                    return logits
            if self.workers is None:
                return self._step(inputs)
            return self.workers.step(self.graph, inputs, self.kv_caches)

    def _step(self, inputs: StepInputs) -> torch.Tensor:
        if self.device.type != "cpu":
            inputs = inputs.to(self.device, non_blocking=self.pin_memory)
        return self.graph(inputs.as_tuple(), self.kv_caches)

    def prepare(self, batch: StepBatch) -> tuple[StepInputs, int]:
        """The step's packed graph inputs and its logit row count (see execute)."""
        chunks: list[Chunk] = []
        rows: list[int] = []
        offset = 0  # where the sequence's tokens start in the packed step
        for seq in batch.seqs:
            request = seq.request
            start, end = request.num_computed_tokens, request.num_computed_tokens + seq.num_new_tokens
            tokens = [request.token_at(p) for p in range(start, end - len(seq.draft_token_ids))]
            chunks.append((tokens + list(seq.draft_token_ids), start, request.block_ids, request.lora_slot))
            offset += seq.num_new_tokens
            rows.extend(range(offset - seq.num_rows, offset))
        offset = 0
        for seq in batch.seqs:
            # the row of position p is p's offset in the packed step
            rows.extend(offset - seq.request.num_computed_tokens + p for p in seq.scored_positions)
            offset += seq.num_new_tokens
        return self.pack(chunks, rows or [0]), len(rows)  # the graph needs >= 1 row; dropped by execute

    def pack(self, chunks: list[Chunk], rows: list[int]) -> StepInputs:
        """Graph inputs of sequences packed back to back: each chunk's tokens from its start position, in its
        blocks, with its LoRA slot; logits of the packed positions `rows`."""
        bs = self.block_size
        positions: list[int] = []
        slots: list[int] = []
        adapters: list[int] = []
        cu_seqlens = [0]
        for tokens, start, blocks, lora_slot in chunks:
            end = start + len(tokens)
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            adapters.extend([lora_slot] * len(tokens))
            cu_seqlens.append(cu_seqlens[-1] + len(tokens))
        return StepInputs.from_lists(
            pin_memory=self.pin_memory,
            input_ids=[t for tokens, _, _, _ in chunks for t in tokens],
            positions=positions,
            slot_mapping=slots,
            block_tables=[blocks + [0] * (self.max_blocks_per_seq - len(blocks)) for _, _, blocks, _ in chunks],
            seq_lens=[start + len(tokens) for tokens, start, _, _ in chunks],
            cu_seqlens_q=cu_seqlens,
            logits_indices=rows,
            lora_slots=adapters,
        )

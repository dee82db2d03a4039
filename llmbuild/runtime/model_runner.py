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
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        cu_seqlens = [0]
        rows: list[int] = []
        adapters: list[int] = []
        for seq in batch.seqs:
            request = seq.request
            start, end = request.num_computed_tokens, request.num_computed_tokens + seq.num_new_tokens
            blocks = request.block_ids
            ids.extend(request.token_at(p) for p in range(start, end - len(seq.draft_token_ids)))
            ids.extend(seq.draft_token_ids)
            positions.extend(range(start, end))
            adapters.extend([request.lora_slot] * seq.num_new_tokens)
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            tables.append(blocks + [0] * (self.max_blocks_per_seq - len(blocks)))
            seq_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + seq.num_new_tokens)
            rows.extend(range(cu_seqlens[-1] - seq.num_rows, cu_seqlens[-1]))
        for seq, seq_start in zip(batch.seqs, cu_seqlens, strict=False):
            # the row of position p is p's offset in the packed step
            rows.extend(seq_start - seq.request.num_computed_tokens + p for p in seq.scored_positions)
        inputs = StepInputs.from_lists(
            pin_memory=self.pin_memory,
            input_ids=ids,
            positions=positions,
            slot_mapping=slots,
            block_tables=tables,
            seq_lens=seq_lens,
            cu_seqlens_q=cu_seqlens,
            logits_indices=rows or [0],  # the graph needs >= 1 row; dropped by execute
            lora_slots=adapters,
        )
        return inputs, len(rows)

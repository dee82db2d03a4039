"""Scheduler: decides which tokens of which requests one step computes.

Each step takes the running requests first (decodes and unfinished prompt chunks, most important
first), then admits waiting requests while the step has token budget (max_num_tokens), batch room
(max_batch_size) and free KV blocks. A prompt longer than the remaining budget is split into
chunks over several steps (chunked prefill), so a long prompt never stalls running decodes.
Queues are ordered by (priority, arrival): FCFS unless a request asks for a priority.

On admission the longest prefix of the request's full blocks found in the prefix cache is reused
instead of recomputed; blocks are registered in the cache as they fill. When blocks run out the
least important running request is preempted: its blocks are released (they stay cached) and it
is recomputed from its tokens later, so nothing is lost.

With LoRA adapters (runtime/lora_manager.py) the running batch holds at most max_loras distinct ones: a
request whose adapter would be one too many waits, and later requests with adapters wait behind it.

With speculative decoding (runtime/speculative.py) a decoding sequence also computes the tokens it
proposes (asked once per step for all decoding sequences: a draft engine proposes for them in one batch);
update() keeps those the sampler accepted and shortens the sequence past the others.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from llmbuild.errors import RequestError
from llmbuild.runtime.block_pool import BlockPool, block_hash
from llmbuild.runtime.request import FinishReason, Request, RequestStatus
from llmbuild.runtime.speculative import Speculator


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """num_new_tokens tokens of request, starting at its num_computed_tokens."""

    request: Request
    num_new_tokens: int
    samples: bool
    """The chunk reaches the request's last known token, so the step samples its next token."""
    draft_token_ids: tuple[int, ...] = ()
    """Proposed tokens computed after the last known one (the chunk's last len(draft_token_ids) tokens)."""

    @property
    def num_rows(self) -> int:
        """Logit rows the sequence samples from: its last known token's and one per proposed token."""
        return 1 + len(self.draft_token_ids) if self.samples else 0

    @property
    def scored_positions(self) -> range:
        """Positions of this chunk whose logits score the next prompt token (params.prompt_logprobs),
        less those scored before a preemption."""
        request = self.request
        if request.params.prompt_logprobs is None:
            return range(0)
        start = max(request.num_computed_tokens, len(request.prompt_logprobs) - 1)
        end = min(request.num_computed_tokens + self.num_new_tokens, request.num_prompt_tokens - 1)
        return range(start, max(start, end))


@dataclass(frozen=True, slots=True)
class StepBatch:
    seqs: tuple[ScheduledSeq, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def sampling_seqs(self) -> list[ScheduledSeq]:
        """The sequences that sample: their logit rows come first (num_rows each), in batch order."""
        return [s for s in self.seqs if s.samples]

    @property
    def sampling_requests(self) -> list[Request]:
        return [s.request for s in self.seqs if s.samples]

    @property
    def scoring_seqs(self) -> list[ScheduledSeq]:
        """The sequences with prompt positions to score: their logit rows follow the sampling rows."""
        return [s for s in self.seqs if s.scored_positions]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    block_size: int
    eos_token_ids: frozenset[int]
    max_loras: int = 0
    """Distinct LoRA adapters the running batch may hold (the engine's slots; 0: no adapters)."""


class Scheduler:
    """Waiting queue, running list, and the step-by-step decisions between them."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, speculator: Speculator | None = None) -> None:
        self.config = config
        self.pool = pool
        self.speculator = speculator
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, request: Request) -> None:
        """Queue a request; refuse one that could never fit the KV cache on its own."""
        self.check_fits(request)
        bisect.insort(self.waiting, request, key=_sort_key)

    def check_fits(self, request: Request) -> None:
        """Raise RequestError if the request could not fit the whole KV cache even alone."""
        need = math.ceil((request.num_prompt_tokens + request.max_tokens) / self.config.block_size)
        if need > self.pool.num_blocks:
            raise RequestError(
                f"request needs {need} KV blocks for {request.num_prompt_tokens} prompt + {request.max_tokens} "
                f"new tokens but the cache has {self.pool.num_blocks}; lower max_tokens or enlarge the KV cache"
            )

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepBatch:
        """Pick this step's tokens: running requests first, then new ones, within all limits."""
        budget = self.config.max_num_tokens
        seqs: list[ScheduledSeq] = []
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        # proposals this step, for all decoding sequences at once (runtime/speculative.py decides from measured
        # speeds); each is trimmed to the budget left at its turn
        proposals: dict[Request, tuple[int, ...]] = {}
        if self.speculator is not None and self.speculator.allows(len(decoding)):
            proposals = dict(zip(decoding, self.speculator.propose_all(decoding, budget), strict=True))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = proposals.get(request, ())[: budget - 1] if n == 1 else ()
            if drafts and not self._reserve(request, request.num_computed_tokens + n + len(drafts)):
                drafts = ()  # no room for the proposals: decode one token
            if self._reserve(request, request.num_computed_tokens + n):
                seqs.append(self._chunk(request, n, drafts))
                budget -= n + len(drafts)
                i += 1
            else:
                self._preempt(self.running.pop())  # the newest; may be `request` itself
        adapters = {r.lora.lora_id for r in self.running if r.lora is not None}
        waits_for_slot = False
        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_batch_size:
            request = self.waiting[j]
            if request.lora is not None and (
                waits_for_slot or (request.lora.lora_id not in adapters and len(adapters) >= self.config.max_loras)
            ):
                # every slot is taken by running requests: this one waits for one to free up, and no later
                # request with an adapter goes first (it could keep the slot taken): none waits forever
                waits_for_slot = True
                j += 1
                continue
            if not request.block_ids:
                self._reuse_cached_prefix(request)
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._reserve(request, request.num_computed_tokens + n):
                self._release(request)
                break
            self.waiting.pop(j)
            if request.lora is not None:
                adapters.add(request.lora.lora_id)
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=_sort_key)
            if request.num_cached_tokens:
                self.prefix_hit_tokens += request.num_cached_tokens
            self.prefix_queried_tokens += request.num_tokens
            seqs.append(self._chunk(request, n))
            budget -= n
        return StepBatch(tuple(seqs))

    def update(
        self, batch: StepBatch, sampled: list[int], num_accepted: list[int] | None = None
    ) -> list[tuple[Request, int]]:
        """Advance each scheduled request; append its new tokens and finish requests that stop.

        `sampled` holds one token per sampling sequence, in batch order, and `num_accepted` how many of
        the sequence's proposed tokens precede it (all sequences: 0 when None). A stop ends the request
        at the token that stops it. Returns each request that got tokens, with how many.
        """
        tokens = iter(sampled)
        accepted = iter(num_accepted) if num_accepted is not None else None
        advanced = []
        for seq in batch.seqs:
            request = seq.request
            if not seq.samples:
                self._register_full_blocks(request, request.num_computed_tokens + seq.num_new_tokens)
                request.num_computed_tokens += seq.num_new_tokens
                continue
            kept = next(accepted) if accepted is not None else 0
            new_tokens = [*seq.draft_token_ids[:kept], next(tokens)]
            if seq.draft_token_ids and self.speculator is not None:
                self.speculator.record(request, len(seq.draft_token_ids), kept)
            count, reason = 0, None
            while reason is None and count < len(new_tokens):
                request.output_token_ids.append(new_tokens[count])
                reason = self._stop_reason(request, new_tokens[count])
                count += 1
            # the KV cache now holds every token but the newest (rejected proposals' entries lie beyond)
            self._register_full_blocks(request, request.num_tokens - 1)
            request.num_computed_tokens = request.num_tokens - 1
            advanced.append((request, count))
            if reason is not None:
                self.finish(request, reason)
            elif seq.draft_token_ids:
                self._shrink(request)
        return advanced

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request (stopped, length or aborted) and return its blocks to the pool."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.pool.free(request.block_ids)
        request.block_ids = []
        if self.speculator is not None:
            self.speculator.release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _reuse_cached_prefix(self, request: Request) -> None:
        """Start the request after its longest cached prefix of full blocks.

        At least one token is always left to compute (the step must produce logits to sample
        from), so a shared block is never written to. A request that scores its prompt
        (prompt_logprobs) computes it whole: cached blocks hold no logits.
        """
        if request.params.prompt_logprobs is not None:
            return
        num_blocks = (request.num_tokens - 1) // self.config.block_size
        blocks = self.pool.lookup(self._block_hashes(request, num_blocks))
        request.block_ids = blocks
        request.num_computed_tokens = request.num_cached_tokens = len(blocks) * self.config.block_size

    def _register_full_blocks(self, request: Request, num_computed: int) -> None:
        """Put the blocks this step fills into the prefix cache."""
        bs = self.config.block_size
        first, last = request.num_computed_tokens // bs, num_computed // bs
        if last > first:
            hashes = self._block_hashes(request, last)
            for i in range(first, last):
                self.pool.register(request.block_ids[i], hashes[i])

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        bs, hashes = self.config.block_size, request.block_hashes
        if len(hashes) < num_blocks:
            tokens = request.all_token_ids
            for i in range(len(hashes), num_blocks):
                parent = hashes[-1] if hashes else _root_hash(request)
                hashes.append(block_hash(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def _release(self, request: Request) -> None:
        """Give back a request's blocks and computed state (it will be recomputed later)."""
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = request.num_cached_tokens = 0

    def _chunk(self, request: Request, n: int, drafts: tuple[int, ...] = ()) -> ScheduledSeq:
        samples = request.num_computed_tokens + n == request.num_tokens
        return ScheduledSeq(request, n + len(drafts), samples, drafts)

    def _shrink(self, request: Request) -> None:
        """Return the blocks that held only rejected proposals (never registered in the prefix cache)."""
        keep = math.ceil(request.num_tokens / self.config.block_size)
        if len(request.block_ids) > keep:
            self.pool.free(request.block_ids[keep:])
            del request.block_ids[keep:]

    def _reserve(self, request: Request, num_tokens: int) -> bool:
        """Make sure the request owns blocks for num_tokens tokens; False if the pool is short."""
        missing = math.ceil(num_tokens / self.config.block_size) - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > self.pool.num_free:
            return False
        request.block_ids.extend(self.pool.allocate(missing))
        return True

    def _preempt(self, request: Request) -> None:
        self._release(request)
        if self.speculator is not None:
            self.speculator.release(request)
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=_sort_key)
        self.num_preemptions += 1

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.config.eos_token_ids)
        ):
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.max_tokens or request.num_tokens >= self.config.max_seq_len:
            return FinishReason.LENGTH
        return None


def _root_hash(request: Request) -> bytes | None:
    """What a request's first block hash chains from: its adapter's registration, so that KV blocks computed
    with one adapter (or none) are never reused for another."""
    return None if request.lora is None else b"lora:%d" % request.lora.lora_id


def _sort_key(request: Request) -> tuple[int, int]:
    """Queue order: priority (lower first), then arrival."""
    return (request.priority, request.arrival)

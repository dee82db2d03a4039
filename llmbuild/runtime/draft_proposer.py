"""DraftProposer: a second, smaller engine proposes the tokens that speculating sequences check (method draft).

The draft runs on its own paged KV cache and block pool (no prefix cache). For each target request it keeps a
shadow sequence: the tokens whose K/V the draft's cache holds, in the shadow's own blocks. One proposal call,
batched over every sequence that speculates this step:
  1. each shadow is rolled back to the longest common prefix of its tokens and its request's: proposals the
     target accepted stay valid, rejected ones lie past the prefix and are overwritten later (no copies);
  2. one packed draft step (more where the draft's max_num_tokens / max_batch_size say so) catches every
     shadow up to its request's last known token; that token's logits give proposal 1;
  3. k - 1 decode steps of all shadows together, each feeding the proposal before.

    request:  t0 t1 t2 t3 t4 |            shadow before: t0 t1 t2 t3 p p   (prefix t0..t3 kept)
    step 1 feeds t4 -> p1;  steps 2..k feed p1 .. p(k-1) -> p2 .. pk
    shadow after: t0 .. t4 p1 .. p(k-1)   (pk was never fed: its K/V is not needed yet)

Greedy requests get the draft's greedy tokens. Sampled requests get tokens drawn from the draft's distribution
under the request's own temperature / top-k / top-p / min-p (its penalties and biases apply to the target
only), and that distribution is kept (`probabilities`) for the target's verification, Leviathan et al.'s
rejection sampling (runtime/sampler.py `verify`): the output distribution is exactly the target's whatever the
draft is, and a draft close to the target gets most of its proposals kept at any temperature.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmbuild.errors import EngineError
from llmbuild.memory_plan import available_memory_bytes, plan_memory
from llmbuild.runtime.block_pool import BlockPool
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.kv_cache import allocate_kv_cache
from llmbuild.runtime.model_runner import ModelRunner
from llmbuild.runtime.request import Request
from llmbuild.runtime.sampler import filtered_probs


@dataclass
class _Shadow:
    """A request's sequence in the draft's cache."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    """The tokens whose K/V the draft's cache holds, at positions 0 .. len - 1."""


def draft_mismatch(draft: Engine, draft_tokenizer: Any, target: Engine, target_tokenizer: Any) -> str | None:
    """Why `draft` cannot propose tokens for `target` (None: it can): its token ids must mean the same."""
    d, t = draft.manifest, target.manifest
    if d.target.tensor_parallel > 1:
        return f"it has tensor_parallel {d.target.tensor_parallel}; a draft runs on rank 0 only: build it with 1"
    if d.model.vocab_size != t.model.vocab_size:
        return f"its vocab_size is {d.model.vocab_size}, the target's {t.model.vocab_size}"
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        return f"its tokenizer's vocabulary differs from the target's (both {d.model.vocab_size} ids)"
    return None


class DraftProposer:
    """The draft engine, its KV cache, and one shadow sequence per target request that speculated."""

    def __init__(self, draft: Engine, target: Engine, target_tokenizer: Any) -> None:
        """Refuses (EngineError, one line) a draft whose vocabulary differs from the target's."""
        reason = draft_mismatch(draft, draft.load_tokenizer(), target, target_tokenizer)
        if reason:
            raise EngineError(f"draft engine {draft.path} cannot propose for {target.path}: {reason}")
        manifest = draft.manifest
        self.limits = manifest.limits
        self.block_size = manifest.kv_cache.block_size
        plan = plan_memory(
            weight_bytes=draft.weight_bytes,
            kv_bytes_per_token=manifest.model.kv_bytes_per_token(draft.kv_cache_dtype),
            limits=manifest.limits,
            kv_cache=manifest.kv_cache,
            available_bytes=available_memory_bytes(draft.device),
        )
        if plan.num_blocks < 1:
            raise EngineError(f"draft engine {draft.path}: its KV cache holds no block; raise kv_cache.memory_bytes")
        self.pool = BlockPool(plan.num_blocks, enable_prefix_caching=False)
        caches = allocate_kv_cache(manifest.model, plan.num_blocks, self.block_size, draft.kv_cache_dtype, draft.device)
        self.runner = ModelRunner(draft.graph, caches, self.block_size, self.limits.max_seq_len)
        self._shadows: dict[Request, _Shadow] = {}
        self._probs: dict[Request, torch.Tensor] = {}

    @property
    def num_shadows(self) -> int:
        """Requests whose sequence the draft's cache holds (they free it when they finish or are preempted)."""
        return len(self._shadows)

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[tuple[int, ...]]:
        """Up to ks[i] draft tokens to follow requests[i]'s tokens (greedy, or sampled: see the module's
        docstring), all sequences batched. A sequence proposes nothing when its k is 0, the draft's
        max_seq_len is reached or the draft's pool is short."""
        self._probs.clear()
        jobs: list[tuple[int, _Shadow, list[int], int]] = []  # (index, shadow, tokens to feed, k)
        for i, (request, k) in enumerate(zip(requests, ks, strict=True)):
            tokens = request.all_token_ids
            k = min(k, self.limits.max_seq_len + 1 - len(tokens))
            if k < 1:
                continue
            shadow = self._shadows.get(request)
            if shadow is None:
                shadow = self._shadows[request] = _Shadow(request)
            # keep at least the last token to compute: its logits give the first proposal
            keep = _common_prefix(shadow.tokens, tokens, len(tokens) - 1)
            del shadow.tokens[keep:]
            if self._reserve(shadow, len(tokens) + k - 1):
                jobs.append((i, shadow, tokens[keep:], k))
        out: list[tuple[int, ...]] = [()] * len(requests)
        if not jobs:
            return out
        drafts = [[t] for t in self._feed([(shadow, pending) for _, shadow, pending, _ in jobs])]
        for step in range(1, max(k for *_, k in jobs)):
            live = [j for j, job in enumerate(jobs) if job[3] > step]
            nexts = self._feed([(jobs[j][1], [drafts[j][-1][0]]) for j in live])
            for j, token in zip(live, nexts, strict=True):
                drafts[j].append(token)
        for (i, shadow, *_), proposal in zip(jobs, drafts, strict=True):
            out[i] = tuple(token for token, _ in proposal)
            if not shadow.request.params.greedy:
                self._probs[shadow.request] = torch.stack([q for _, q in proposal if q is not None])
        return out

    def probabilities(self, request: Request) -> torch.Tensor | None:
        """The distributions [k, vocab] the latest proposal for `request` was drawn from (None: greedy)."""
        return self._probs.get(request)

    def release(self, request: Request) -> None:
        """Free the shadow of a request that finished or was preempted (no-op if it has none)."""
        self._probs.pop(request, None)
        shadow = self._shadows.pop(request, None)
        if shadow is not None:
            self.pool.free(shadow.block_ids)

    def _reserve(self, shadow: _Shadow, num_tokens: int) -> bool:
        missing = math.ceil(num_tokens / self.block_size) - len(shadow.block_ids)
        if missing > self.pool.num_free:
            return False
        if missing > 0:
            shadow.block_ids.extend(self.pool.allocate(missing))
        return True

    def _feed(self, items: list[tuple[_Shadow, list[int]]]) -> list[tuple[int, torch.Tensor | None]]:
        """Append each item's tokens to its shadow (computing their K/V), in as few draft steps as the
        draft's limits allow; the draft's next token after each item's last one (with the distribution it
        was drawn from, None for greedy)."""
        nexts: dict[int, tuple[int, torch.Tensor | None]] = {}
        step: list[tuple[int, _Shadow, list[int]]] = []
        budget = self.limits.max_num_tokens
        for j, (shadow, tokens) in enumerate(items):
            while tokens:
                # a sequence split over steps ends its step (budget 0), so it never appears twice in one
                n = min(len(tokens), budget)
                step.append((j, shadow, tokens[:n]))
                tokens, budget = tokens[n:], budget - n
                if budget == 0 or len(step) == self.limits.max_batch_size:
                    nexts.update(self._step(step))
                    step, budget = [], self.limits.max_num_tokens
        if step:
            nexts.update(self._step(step))
        return [nexts[j] for j in range(len(items))]

    def _step(self, step: list[tuple[int, _Shadow, list[int]]]) -> dict[int, tuple[int, torch.Tensor | None]]:
        """One packed draft step; {item: the next token after its chunk's last one, and its distribution}."""
        chunks = [(tokens, len(shadow.tokens), shadow.block_ids, 0) for _, shadow, tokens in step]  # base weights
        rows = list(itertools.accumulate(len(tokens) for _, _, tokens in step))
        inputs = self.runner.pack(chunks, [end - 1 for end in rows])
        for _, shadow, tokens in step:
            shadow.tokens.extend(tokens)
        logits = self.runner.run(inputs)[: len(step)]
        greedy = logits.argmax(dim=-1).tolist()
        out: dict[int, tuple[int, torch.Tensor | None]] = {}
        for (j, shadow, _), row, best in zip(step, logits, greedy, strict=True):
            params = shadow.request.params
            if params.greedy:
                out[j] = (best, None)
                continue
            q = filtered_probs(row.float().cpu() / params.temperature, params)
            out[j] = (int(torch.multinomial(q, 1, generator=shadow.request.generator)), q)
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    return next((i for i in range(n) if a[i] != b[i]), n)

"""Speculative decoding: which tokens a decoding sequence proposes, and when proposing pays.

A sequence that speculates computes its last known token and k proposed tokens in one step (positions
n-1 .. n-1+k, one logit row each). The sampler then draws the target's token at each row in order, as
plain decoding would, and keeps the proposals up to the first one that differs from its draw; the draw
there (or after the last proposal) is the step's final token. With a proposal that is a single guess
(prompt lookup: a one-hot draft distribution), comparing the draw with the guess is exactly Leviathan et
al.'s rejection sampling: the guess is kept with probability p(guess), and on rejection the token comes
from p with the guess removed, renormalised. So the output distribution is the target's, and a seeded
request draws the same tokens as without speculation (one draw per emitted token, in the same order).
Proposals come from prompt lookup (method ngram) or from a draft engine (method draft,
runtime/draft_proposer.py), computed for all of a step's decoding sequences in one call: its greedy tokens for
greedy requests, and for sampled ones tokens drawn from its own distribution, which the sampler's rejection
sampling then takes into account (a draft's sampled tokens are not guesses: seeded requests stay
reproducible run to run, but draw other tokens than without speculation; the distribution is the same).

Rejected positions are rolled back by shortening the sequence: their KV entries sit past
num_computed_tokens and are overwritten later; nothing is copied.

When it pays: a verification step of 1 + k tokens costs little more than a decode step where a step is memory-bound,
but on a CPU with few cores it is close to compute-bound: on 2 cores a step of 1 + 4 tokens costs 1.84x a decode
step of TinyLlama in bf16, 1.23x one of the demo model (bench/results/spec-verify-cost*.md). So the engine measures
instead of assuming: for each number of decoding sequences it keeps the tokens per second of model time of steps
with proposals (the time spent proposing included: a draft engine's steps) and of steps without, lets sequences
propose only while that has been the faster kind, and takes the other kind one step in WARMUP_EXPLORE_EVERY until it
has WARMUP_SAMPLES measurements, then one in EXPLORE_EVERY (fewer while that keeps confirming the choice, down to
one in MAX_EXPLORE_EVERY) so the estimate follows the workload. On top: no proposals in steps with more than
`max_batch_size` decoding sequences, and a sequence whose running acceptance falls below `min_acceptance_rate`
pauses for PAUSE_TOKENS tokens, then tries again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.request import Request


class Drafter(Protocol):
    """What proposes for method draft (runtime/draft_proposer.DraftProposer; a Protocol so that this module,
    which the scheduler imports, does not import the model runner the draft proposer uses)."""

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[tuple[int, ...]]: ...

    def release(self, request: Request) -> None: ...

    def probabilities(self, request: Request) -> torch.Tensor | None: ...


PAUSE_TOKENS = 32
"""Tokens a sequence decodes without proposals after its acceptance rate fell below the threshold."""
RATE_WEIGHT = 0.3
"""Weight of the latest verification in a sequence's running acceptance rate (exponential average)."""
EXPLORE_EVERY = 64
"""One step in this many (per number of decoding sequences) takes the kind, with or without proposals,
that has been slower, so that a change of workload is noticed; each exploration that finds that kind still
slower doubles the interval, up to MAX_EXPLORE_EVERY (a draft engine's exploring step is dear: it first
catches the draft up on every token since its last one)."""
MAX_EXPLORE_EVERY = 1024
SPEED_WEIGHT = 0.03
"""Weight of the latest step in the tokens and seconds averages behind a speed (exponential averages; plain
means over the first 1 / SPEED_WEIGHT steps, so that a first unlucky step weighs no more than the others). A
verification keeps anything from 0 to k tokens, in streaks: at 0.1 the average followed the last few and the demo
model's 2.1 tokens per verification step read as 1.3-1.6, which kept speculation off where it paid."""
WARMUP_SAMPLES = 8
"""Steps of the slower kind measured before exploring slows down: until then it is taken one step in
WARMUP_EXPLORE_EVERY (else its estimate rests on a step or two for hundreds of steps: the demo model's first
verification rejecting everything kept speculation off at batch 1 where it paid 1.1x)."""
WARMUP_EXPLORE_EVERY = 4


@dataclass
class _Speed:
    """Tokens per second of one kind of step: averages of tokens and of seconds, divided (a ratio of means:
    a lucky step's many accepted tokens weigh by its time, not as a rate of its own)."""

    tokens: float
    seconds: float
    count: int = 1
    """Steps measured."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def add(self, tokens: int, seconds: float) -> None:
        self.count += 1
        weight = max(SPEED_WEIGHT, 1 / self.count)
        self.tokens += weight * (tokens - self.tokens)
        self.seconds += weight * (seconds - self.seconds)


@dataclass
class _Speeds:
    """Pure decode steps with proposals and without, for one number of decoding sequences (None: not
    measured yet)."""

    with_proposals: _Speed | None = None
    without: _Speed | None = None
    steps: int = 0
    explore_every: int = EXPLORE_EVERY
    next_explore: int = EXPLORE_EVERY
    exploring: bool = False
    """Whether the latest step allowed took the slower kind."""
    explored_proposals: bool = False
    """Which kind it took (a step allowed to propose may find nothing to propose: then it measured the other)."""

    def proposals_faster(self) -> bool:
        assert self.with_proposals is not None and self.without is not None
        return self.with_proposals.tokens_per_second >= self.without.tokens_per_second

    def explore_interval(self) -> int:
        """Steps until the slower kind is taken again."""
        assert self.with_proposals is not None and self.without is not None
        slower = self.without if self.proposals_faster() else self.with_proposals
        return self.explore_every if slower.count >= WARMUP_SAMPLES else WARMUP_EXPLORE_EVERY


class PromptLookup:
    """Prompt lookup over one request's tokens (prompt and output), kept up to date as they grow: for each n in
    [min_n, max_n], where each n-gram that some later token follows last started. A proposal then costs a few
    dictionary lookups and the step's new tokens a few insertions, instead of a scan of the whole context
    every step (that scan took 0.13 ms at 250 tokens, growing with the context, against the demo model's
    0.2 ms decode steps)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def propose(self, k: int) -> list[int]:
        """The (up to) k tokens that followed the latest earlier occurrence of the last n tokens (as of the
        latest `extend`), for the longest n in [min_n, max_n] that occurs; [] when none does."""
        tokens = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            start = self.starts[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []

    def extend(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Bring the index up to the request's tokens: prompt + output (which only grow while it runs)."""
        known = len(self.tokens)
        if known > len(prompt) + len(output) or (
            known > len(prompt) and self.tokens[-1] != output[known - len(prompt) - 1]
        ):
            # an output cut short (at a stop string), or cut and grown again: start over
            self.tokens, known = [], 0
            for table in self.starts.values():
                table.clear()
        if known < len(prompt):
            self.tokens.extend(prompt[known:])
            self.tokens.extend(output)
        else:
            self.tokens.extend(output[known - len(prompt) :])
        tokens = self.tokens
        for n, table in self.starts.items():
            # the n-grams that end before the last token (a later token follows them), in order: latest wins
            for i in range(max(known - n, 0), len(tokens) - n):
                table[tuple(tokens[i : i + n])] = i


def speculation_override(
    section: SpeculativeSection | None, enabled: bool | None, num_tokens: int | None, draft: bool = False
) -> SpeculativeSection | bool:
    """LLMEngine's `speculative` argument for an engine whose manifest holds `section`: off when `enabled` is
    False; with `num_tokens` or `draft` (a draft engine is given), those settings over the engine's other ones
    (or the defaults): prompt lookup, or method draft, proposing `num_tokens` (else the engine's number, 4 by
    default); else the engine's own (True)."""
    if enabled is False:
        return False
    if num_tokens is None and not draft:
        return True
    settings = section.model_dump() if section is not None else {}
    if num_tokens is not None:
        settings["num_speculative_tokens"] = num_tokens
    if draft:
        settings["method"] = "draft"
    return SpeculativeSection(**settings)


class Speculator:
    """Proposes tokens for decoding sequences and keeps the acceptance counts (engine-wide and per request)."""

    def __init__(self, config: SpeculativeSection, max_seq_len: int, drafter: Drafter | None = None) -> None:
        """`drafter` proposes for method draft (None: prompt lookup)."""
        self.config = config
        self.drafter = drafter
        self.max_seq_len = max_seq_len
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verifications = 0
        self._speeds: dict[int, _Speeds] = {}
        self._lookups: dict[Request, PromptLookup] = {}
        self._proposal_seconds = 0.0  # this step's: a draft engine's steps cost time outside the target's step

    def allows(self, num_decoding: int) -> bool:
        """Whether a step with `num_decoding` decoding sequences lets them propose (call once per step)."""
        self._proposal_seconds = 0.0
        if num_decoding > self.config.max_batch_size:
            return False
        if not self.config.adaptive:
            return True
        speeds = self._speeds_of(num_decoding)
        speeds.steps += 1
        if speeds.with_proposals is None or speeds.without is None:
            return speeds.with_proposals is None  # measure a step with proposals, then one without
        speeds.exploring = speeds.steps >= speeds.next_explore
        allowed = speeds.proposals_faster() != speeds.exploring
        if speeds.exploring:
            speeds.next_explore = speeds.steps + speeds.explore_interval()
            speeds.explored_proposals = allowed
        return allowed

    def observe(self, num_decoding: int, proposed: bool, num_tokens: int, seconds: float) -> None:
        """A pure decode step's outcome: `num_tokens` emitted in `seconds` of model time, with proposals or not;
        the time its proposals took (a draft engine's steps) is added, so a draft that costs more than it
        saves is measured as such."""
        seconds += self._proposal_seconds
        self._proposal_seconds = 0.0
        speeds = self._speeds_of(num_decoding)
        speed = speeds.with_proposals if proposed else speeds.without
        if speed is None:
            if proposed:
                speeds.with_proposals = _Speed(num_tokens, seconds)
            else:
                speeds.without = _Speed(num_tokens, seconds)
            if speeds.with_proposals and speeds.without:  # both measured once: warm up the slower one's estimate
                speeds.next_explore = speeds.steps + speeds.explore_interval()
            return
        before = speeds.proposals_faster() if speeds.with_proposals and speeds.without else None
        speed.add(num_tokens, seconds)
        if before is None:
            return
        after = speeds.proposals_faster()
        if speeds.exploring and proposed != speeds.explored_proposals:
            pass  # the exploring step measured the kind it meant to avoid (nothing was proposed): no news
        elif speeds.exploring:  # the slower kind, tried: still slower, look less often; else as often as first
            if after == proposed:
                speeds.explore_every = EXPLORE_EVERY
            elif speed.count > WARMUP_SAMPLES:
                speeds.explore_every = min(2 * speeds.explore_every, MAX_EXPLORE_EVERY)
        elif after != before:  # the chosen kind slowed down past the other: the workload changed
            speeds.explore_every = EXPLORE_EVERY
        else:
            return
        speeds.next_explore = speeds.steps + speeds.explore_interval()
        speeds.exploring = False

    def propose(self, request: Request, budget: int) -> tuple[int, ...]:
        """The tokens `request` (a decoding sequence) checks this step, at most budget - 1 of them."""
        return self.propose_all([request], budget)[0]

    def propose_all(self, requests: Sequence[Request], budget: int) -> list[tuple[int, ...]]:
        """The tokens each of `requests` (this step's decoding sequences) checks, each at most budget - 1 of
        them; with a draft engine one batched call proposes for all. A proposal cut short keeps its prefix,
        so the scheduler trims each to what is left of the step's budget at its turn."""
        ks = [self._max_proposals(r, budget) if self._speculates(r) else 0 for r in requests]
        if self.drafter is None:
            # not timed: a request's first lookup indexes its whole prompt (3 ms at 4000 tokens), once in its life,
            # and would weigh as one step's cost in the speed it proposes at
            lookups = [self._lookup(r) if k else None for r, k in zip(requests, ks, strict=True)]
            for request, lookup in zip(requests, lookups, strict=True):
                if lookup is not None:
                    lookup.extend(request.prompt_token_ids, request.output_token_ids)
            start = time.perf_counter()
            proposals = [tuple(lookup.propose(k)) if lookup else () for lookup, k in zip(lookups, ks, strict=True)]
        else:
            start = time.perf_counter()
            proposals = self.drafter.propose(requests, ks)
        self._proposal_seconds += time.perf_counter() - start
        return proposals

    def draft_probabilities(self, request: Request, num_drafts: int) -> torch.Tensor | None:
        """The distributions the first `num_drafts` proposals of `request` this step were drawn from, for
        rejection sampling (None: the proposals are guesses, checked by exact match: prompt lookup, greedy)."""
        probs = self.drafter.probabilities(request) if self.drafter is not None and num_drafts else None
        return probs[:num_drafts] if probs is not None else None

    def release(self, request: Request) -> None:
        """A request left the running batch (finished or preempted): drop what was kept for it."""
        self._lookups.pop(request, None)
        if self.drafter is not None:
            self.drafter.release(request)

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Count one verification of `num_drafts` proposals, `num_accepted` of them kept."""
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.num_verifications += 1
        request.num_draft_tokens += num_drafts
        request.num_accepted_tokens += num_accepted
        rate = (1 - RATE_WEIGHT) * request.acceptance_rate + RATE_WEIGHT * num_accepted / num_drafts
        if rate < self.config.min_acceptance_rate:
            request.speculation_paused_until = len(request.output_token_ids) + PAUSE_TOKENS
            # after the pause, one more verification that accepts nothing pauses it again
            rate = self.config.min_acceptance_rate
        request.acceptance_rate = rate

    def _speeds_of(self, num_decoding: int) -> _Speeds:
        speeds = self._speeds.get(num_decoding)
        if speeds is None:  # not setdefault: that would build a _Speeds on every step
            speeds = self._speeds[num_decoding] = _Speeds()
        return speeds

    def _lookup(self, request: Request) -> PromptLookup:
        lookup = self._lookups.get(request)
        if lookup is None:
            lookup = self._lookups[request] = PromptLookup(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        return lookup

    def _max_proposals(self, request: Request, budget: int) -> int:
        # the step's final token counts against max_tokens and max_seq_len too
        return min(
            self.config.num_speculative_tokens,
            budget - 1,
            request.max_tokens - len(request.output_token_ids) - 1,
            self.max_seq_len - request.num_tokens - 1,
        )

    def _speculates(self, request: Request) -> bool:
        return request.params.speculate and len(request.output_token_ids) >= request.speculation_paused_until

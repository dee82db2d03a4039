"""Sampler: one next token per row of logits, each row with its request's own parameters.

Order of operations (as in vLLM): logit_bias -> penalties -> min_tokens EOS suppression -> temperature ->
top-k -> top-p -> min-p -> draw. Seeded requests draw from their own generator, so a seed
gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmbuild.runtime.logprobs import TokenLogprobs, token_logprobs
from llmbuild.runtime.request import Request
from llmbuild.runtime.sampling_params import SamplingParams


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits: [len(requests), vocab] fp32 -> one token id per request."""
        return self.verify(logits, requests, [()] * len(requests))[0]

    def verify(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        drafts: Sequence[Sequence[int]],
        draft_probs: Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Check each request's proposed tokens; returns (final token, proposals kept) per request.

        `logits` holds 1 + len(drafts[i]) rows for request i, in order. Proposals given as guesses (no
        draft_probs[i]: prompt lookup, greedy drafts) are checked by drawing row j as plain decoding would
        after the first j proposals and keeping them while they equal those draws; the first draw that
        differs, or the one after the last proposal, is the final token (runtime/speculative.py: lossless).
        Proposals sampled by a draft from draft_probs[i] (row j: the distribution proposal j was drawn from)
        go through Leviathan et al.'s rejection sampling instead (`_accept_sampled`): the same guarantee with
        more proposals kept when the draft's distribution is close to the target's.
        """
        fast = all(r.params.greedy and not self._adjusts_logits(r.params, r.output_token_ids) for r in requests)
        best = logits.argmax(dim=-1).tolist() if fast else None
        if not fast:
            logits = logits.cpu()  # the requests' generators are CPU generators
        probs = draft_probs or [None] * len(requests)
        tokens, kept = [], []
        row = 0
        for request, proposal, q in zip(requests, drafts, probs, strict=True):
            end = row + len(proposal) + 1
            if q is not None and not request.params.greedy:
                token, j = self._accept_sampled(logits[row:end], request, proposal, q.cpu())
            else:
                token, j = self._accept_guesses(
                    logits[row:end], request, proposal, best[row:end] if best is not None else None
                )
            tokens.append(token)
            kept.append(j)
            row = end
        return tokens, kept

    def _accept_guesses(
        self, rows: torch.Tensor, request: Request, proposal: Sequence[int], best: list[int] | None
    ) -> tuple[int, int]:
        # the output as the row after j kept proposals sees it (penalties, min_tokens); unused by argmax
        output = list(request.output_token_ids) if best is None else []
        for j in range(len(proposal) + 1):
            token = best[j] if best is not None else self._draw(rows[j], request, output)
            if j == len(proposal) or token != proposal[j]:
                break
            output.append(token)
        return token, j

    def _accept_sampled(
        self, rows: torch.Tensor, request: Request, proposal: Sequence[int], q: torch.Tensor
    ) -> tuple[int, int]:
        """Leviathan et al.: keep proposal j (drawn from q[j]) with probability min(1, p(x) / q(x)), p the
        target's distribution at row j as plain decoding samples it; at the first rejection draw from
        max(p - q[j], 0) renormalised, after the last proposal from p. Each emitted token is distributed as
        p, whatever q is."""
        output = list(request.output_token_ids)
        generator = request.generator
        for j, x in enumerate(proposal):
            p = self._target_probs(rows[j], request, output)
            if float(torch.rand((), generator=generator)) * float(q[j, x]) < float(p[x]):
                output.append(x)
                continue
            residual = (p - q[j]).clamp(min=0)
            total = float(residual.sum())
            # p == q (up to rounding) never rejects; should it, p itself is the distribution to draw from
            return int(torch.multinomial(residual / total if total > 0 else p, 1, generator=generator)), j
        p = self._target_probs(rows[len(proposal)], request, output)
        return int(torch.multinomial(p, 1, generator=generator)), len(proposal)

    def logprobs(self, logits: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[TokenLogprobs | None]:
        """For each request that asked for logprobs: its sampled token's and its top alternatives'
        (runtime/logprobs.py: of the raw model distribution)."""
        out: list[TokenLogprobs | None] = []
        for row, request, token in zip(logits, requests, tokens, strict=True):
            k = request.params.logprobs
            out.append(None if k is None else token_logprobs(row[None], [token], k)[0])
        return out

    def _draw(self, row: torch.Tensor, request: Request, output: list[int]) -> int:
        """One token from `row` for `request` whose output so far is `output`."""
        params = request.params
        if params.greedy:
            return int(self._adjusted(row, request, output).argmax())
        return int(torch.multinomial(self._target_probs(row, request, output), 1, generator=request.generator))

    def _target_probs(self, row: torch.Tensor, request: Request, output: list[int]) -> torch.Tensor:
        """The distribution a sampled request draws its next token from, given logits `row` and its output."""
        return filtered_probs(self._adjusted(row, request, output) / request.params.temperature, request.params)

    def _adjusted(self, row: torch.Tensor, request: Request, output: list[int]) -> torch.Tensor:
        params = request.params
        if self._adjusts_logits(params, output):
            return self._adjust(row.clone(), params, request.prompt_token_ids, output)
        return row

    @staticmethod
    def _adjusts_logits(params: SamplingParams, output: Sequence[int]) -> bool:
        return params.adjusts_logits or len(output) < params.min_tokens

    def _adjust(self, row: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
        if params.logit_bias:
            biased, biases = zip(*params.logit_bias, strict=True)
            row[list(biased)] += torch.tensor(biases, dtype=row.dtype)
        if params.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
            picked = row[seen]
            row[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and output:
            counts = torch.bincount(torch.tensor(output), minlength=self.vocab_size)
            counts = counts[: self.vocab_size].to(row.dtype)
            row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
        if len(output) < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            ids = [t for t in banned if t < self.vocab_size]
            if ids:
                row[ids] = float("-inf")
        return row


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [vocab] after top-k, top-p and min-p filtering of temperature-scaled logits."""
    logits = logits.clone()
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top one always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.max(), 0.0, probs)
        probs = probs / probs.sum()
    return probs

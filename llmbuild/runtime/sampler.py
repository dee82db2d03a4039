"""Sampler: one next token per row of logits, each row with its request's own parameters.

Order of operations (as in vLLM): logit_bias -> penalties -> min_tokens EOS suppression -> temperature ->
top-k -> top-p -> min-p -> draw. Seeded requests draw from their own generator, so a seed
gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

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
        if all(r.params.greedy and not self._adjusts_logits(r) for r in requests):
            return logits.argmax(dim=-1).tolist()
        logits = logits.cpu()  # the requests' generators are CPU generators
        tokens = []
        for row, request in zip(logits, requests, strict=True):
            params = request.params
            if self._adjusts_logits(request):
                row = self._adjust(row.clone(), request)
            if params.greedy:
                tokens.append(int(row.argmax()))
                continue
            probs = filtered_probs(row / params.temperature, params)
            tokens.append(int(torch.multinomial(probs, 1, generator=request.generator)))
        return tokens

    def logprobs(self, logits: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[TokenLogprobs | None]:
        """For each request that asked for logprobs: its sampled token's and its top alternatives'
        (runtime/logprobs.py: of the raw model distribution)."""
        out: list[TokenLogprobs | None] = []
        for row, request, token in zip(logits, requests, tokens, strict=True):
            k = request.params.logprobs
            out.append(None if k is None else token_logprobs(row[None], [token], k)[0])
        return out

    def _adjusts_logits(self, request: Request) -> bool:
        return request.params.adjusts_logits or len(request.output_token_ids) < request.params.min_tokens

    def _adjust(self, row: torch.Tensor, request: Request) -> torch.Tensor:
        params = request.params
        if params.logit_bias:
            biased, biases = zip(*params.logit_bias, strict=True)
            row[list(biased)] += torch.tensor(biases, dtype=row.dtype)
        if params.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long)
            picked = row[seen]
            row[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and request.output_token_ids:
            counts = torch.bincount(torch.tensor(request.output_token_ids), minlength=self.vocab_size)
            counts = counts[: self.vocab_size].to(row.dtype)
            row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
        if len(request.output_token_ids) < params.min_tokens:
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

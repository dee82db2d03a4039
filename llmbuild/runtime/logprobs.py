"""Log-probabilities of tokens under the model's raw distribution: sampled tokens and prompt tokens.

As in the OpenAI API and vLLM, they are taken before temperature, penalties, logit_bias and
filtering: they score the model, not the request's sampling choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One token's log-probability, its rank and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, logprob) of the most likely tokens, best first."""
    rank: int = 1
    """1 + the number of tokens the model found strictly more likely (1: the argmax)."""


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """logits [n, vocab] (any float dtype) and the token that followed each row -> one entry per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1))
    ranks = ((logp > chosen).sum(dim=1) + 1).tolist()
    values = chosen.squeeze(1).tolist()
    if k:
        top = torch.topk(logp, min(k, logp.shape[1]))
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprobs(t, v, p, r) for t, v, p, r in zip(tokens, values, tops, ranks, strict=True)]

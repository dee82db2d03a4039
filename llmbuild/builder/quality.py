"""Quality of a (quantized) graph against a reference graph on held-out text.

Both models run teacher-forced over the same token windows; reported: perplexity of each, the mean
KL divergence KL(reference || candidate) of the next-token distributions, and top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmbuild.builder.models.llama import LlamaModel


@dataclass(frozen=True)
class Quality:
    reference_perplexity: float
    perplexity: float
    mean_kl: float
    top1_agreement: float
    tokens: int


def sequence_logits(model: LlamaModel, ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """fp32 logits [L, vocab] of one sequence, prefilled in one step through the paged graph."""
    cfg, n = model.cfg, len(ids)
    blocks = math.ceil(n / block_size)
    caches = [
        torch.zeros(blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=model.embed.weight.dtype)
        for _ in range(2 * cfg.num_layers)
    ]
    with torch.inference_mode():
        return model(
            ids,
            torch.arange(n),
            torch.arange(n),
            torch.arange(blocks, dtype=torch.int32)[None],
            torch.tensor([n], dtype=torch.int32),
            torch.tensor([0, n], dtype=torch.int32),
            torch.arange(n),
            caches,
        )


def compare(reference: LlamaModel, candidate: LlamaModel, windows: list[torch.Tensor]) -> Quality:
    """Teacher-forced comparison over token windows (each predicts its own tokens 1..L-1)."""
    nll_ref = nll = kl = agree = 0.0
    count = 0
    for ids in windows:
        ref = torch.log_softmax(sequence_logits(reference, ids)[:-1], -1)
        got = torch.log_softmax(sequence_logits(candidate, ids)[:-1], -1)
        target = ids[1:]
        nll_ref -= ref.gather(1, target[:, None]).sum().item()
        nll -= got.gather(1, target[:, None]).sum().item()
        kl += (ref.exp() * (ref - got)).sum().item()
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        count += len(target)
    return Quality(math.exp(nll_ref / count), math.exp(nll / count), kl / count, agree / count, count)

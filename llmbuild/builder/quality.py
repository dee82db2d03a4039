"""Quality of a (quantized) graph against a reference graph on held-out text: the build's gate.

Both models run teacher-forced over the same token windows; reported: perplexity of each, the mean
KL divergence KL(reference || candidate) of the next-token distributions, and top-1 agreement.
The built-in held-out text (llmbuild/data/heldout.txt) is prose of the Python documentation (PSF
License), the held-out part of the demo model's corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbuild.builder.models.llama import LlamaModel, prefill_metadata
from llmbuild.errors import BuildError
from llmbuild.recipe import QualitySection

HELD_OUT = Path(__file__).parents[1] / "data" / "heldout.txt"
EVAL_VERSION = 1
"""Bump when the evaluation changes: cached quality metrics are keyed by it."""
NUM_WINDOWS, WINDOW = 8, 256


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
    positions, meta, blocks = prefill_metadata(1, n, block_size)
    caches = [
        torch.zeros(blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=model.embed.weight.dtype)
        for _ in range(2 * cfg.num_layers)
    ]
    with torch.inference_mode():
        return model(ids, positions, *meta, torch.arange(n), caches)


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


def held_out_windows(tokenizer_dir: Path, num_windows: int, window: int) -> list[torch.Tensor]:
    """Consecutive token windows of the built-in held-out text, in the model's own tokenizer.

    Paragraphs are packed as documents usually are in training: each tokenized on its own (with the
    tokenizer's BOS, if it adds one) and followed by EOS.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids: list[int] = []
    for paragraph in HELD_OUT.read_text(encoding="utf-8").split("\n\n"):
        if paragraph.strip():
            ids += tok(paragraph.strip())["input_ids"] + eos
    count = min(num_windows, len(ids) // window)
    return [torch.tensor(ids[i * window : (i + 1) * window]) for i in range(count)]


def check_gate(gate: QualitySection, quality: Quality) -> None:
    """Raise BuildError naming every threshold the quantized graph misses."""
    failures = []
    if gate.max_kl is not None and quality.mean_kl > gate.max_kl:
        failures.append(f"mean KL {quality.mean_kl:.4g} > quality.max_kl {gate.max_kl:g}")
    if gate.min_top1 is not None and quality.top1_agreement < gate.min_top1:
        failures.append(f"top-1 agreement {quality.top1_agreement:.4f} < quality.min_top1 {gate.min_top1:g}")
    if failures:
        raise BuildError(
            f"quality gate failed: {'; '.join(failures)} (perplexity {quality.perplexity:.2f} vs "
            f"{quality.reference_perplexity:.2f} unquantized); no engine was written. Exclude sensitive "
            "layers (quantization.exclude) or choose a finer format"
        )

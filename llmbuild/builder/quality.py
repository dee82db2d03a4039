"""Quality of a (quantized) graph against a reference graph on held-out text: the build's gate.

Both models run teacher-forced over the same token windows; reported: perplexity of each, the mean
KL divergence KL(reference || candidate) of the next-token distributions, and top-1 agreement.
The built-in held-out text (llmbuild/data/heldout.txt) is prose of the Python documentation (PSF
License), the held-out part of the demo model's corpus.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.models.llama import LlamaModel, prefill_metadata
from llmbuild.builder.retarget import eval_device
from llmbuild.builder.weights import load_weights
from llmbuild.errors import BuildError, EngineError
from llmbuild.manifest import RECIPE, REPORT, TOKENIZER_DIR, Manifest
from llmbuild.recipe import QualitySection, load_recipe
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.model_runner import allocate_kv_cache

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
    cfg, n, device = model.cfg, len(ids), model.embed.weight.device
    positions, meta, blocks = prefill_metadata(1, n, block_size, device)
    caches = [
        torch.zeros(blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=model.kv_cache_dtype(), device=device)
        for _ in range(2 * cfg.num_layers)
    ]
    with torch.inference_mode():
        return model(ids.to(device), positions, *meta, torch.arange(n, device=device), caches)


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def compare(reference: LlamaModel | LogitsFn, candidate: LlamaModel | LogitsFn, windows: list[torch.Tensor]) -> Quality:
    """Teacher-forced comparison over token windows (each predicts its own tokens 1..L-1).

    Each side is a model graph or a function from token ids [L] to fp32 logits [L, vocab].
    """
    ref_fn, got_fn = (partial(sequence_logits, m) if isinstance(m, LlamaModel) else m for m in (reference, candidate))
    nll_ref = nll = kl = agree = 0.0
    count = 0
    for ids in windows:
        ref = torch.log_softmax(ref_fn(ids)[:-1].cpu(), -1)
        got = torch.log_softmax(got_fn(ids)[:-1].cpu(), -1)
        target = ids[1:]
        nll_ref -= ref.gather(1, target[:, None]).sum().item()
        nll -= got.gather(1, target[:, None]).sum().item()
        kl += (ref.exp() * (ref - got)).sum().item()
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        count += len(target)
    return Quality(math.exp(nll_ref / count), math.exp(nll / count), kl / count, agree / count, count)


def engine_logits(engine: Engine) -> LogitsFn:
    """fp32 logits [L, vocab] of one sequence through a loaded engine's own graph (compiled or eager),
    prefilled in chunks of at most limits.max_num_tokens tokens, as the runtime would."""
    manifest = engine.manifest
    bs, chunk = manifest.kv_cache.block_size, manifest.limits.max_num_tokens
    max_blocks = math.ceil(manifest.limits.max_seq_len / bs)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        n = len(ids)
        blocks = math.ceil(n / bs)
        caches = allocate_kv_cache(manifest.model, blocks, bs, engine.kv_cache_dtype, engine.device)
        table = torch.zeros(1, max_blocks, dtype=torch.int32)
        table[0, :blocks] = torch.arange(blocks, dtype=torch.int32)  # block i holds positions i*bs..: slot = position
        out = []
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            positions = torch.arange(start, end)
            step = (
                ids[start:end],
                positions,
                positions,
                table,
                torch.tensor([end], dtype=torch.int32),
                torch.tensor([0, end - start], dtype=torch.int32),
                torch.arange(end - start),
            )
            with torch.inference_mode():
                out.append(engine.graph(tuple(t.to(engine.device) for t in step), caches).float().cpu())
        return torch.cat(out)

    return logits


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


def gate_failures(gate: QualitySection, quality: Quality) -> list[str]:
    """One entry per threshold of the recipe's quality section that `quality` misses."""
    failures = []
    if gate.max_kl is not None and quality.mean_kl > gate.max_kl:
        failures.append(f"mean KL {quality.mean_kl:.4g} > quality.max_kl {gate.max_kl:g}")
    if gate.min_top1 is not None and quality.top1_agreement < gate.min_top1:
        failures.append(f"top-1 agreement {quality.top1_agreement:.4f} < quality.min_top1 {gate.min_top1:g}")
    return failures


def check_gate(gate: QualitySection, quality: Quality) -> None:
    """Raise BuildError naming every threshold the quantized graph misses."""
    failures = gate_failures(gate, quality)
    if failures:
        raise BuildError(
            f"quality gate failed: {'; '.join(failures)} (perplexity {quality.perplexity:.2f} vs "
            f"{quality.reference_perplexity:.2f} unquantized); no engine was written. Exclude sensitive "
            "layers (quantization.exclude) or choose a finer format"
        )


def engine_quality(engine_dir: Path, checkpoint_dir: Path | None = None) -> Quality:
    """Re-run the build's quality evaluation on a built engine: its own graph and weights against
    the unquantized checkpoint it was built from (checked by hash), on the same held-out windows."""
    if Manifest.load(engine_dir).target.tensor_parallel > 1:
        raise EngineError(
            f"{engine_dir}: --quality runs single-rank engines; verify the same recipe built with "
            "target.tensor_parallel: 1 (a tensor-parallel build shards those very weights)"
        )
    engine = Engine.load(engine_dir)
    manifest = engine.manifest
    if not manifest.quantization.quantized:
        raise EngineError(f"{engine_dir}: not a quantized engine: there is nothing to compare against its checkpoint")
    if checkpoint_dir is None:
        report = engine_dir / REPORT
        built_from = json.loads(report.read_text()).get("checkpoint") if report.is_file() else None
        if not built_from:
            raise EngineError(f"{engine_dir}: no report.json names its checkpoint; pass --checkpoint DIR")
        checkpoint_dir = Path(built_from)
    if not checkpoint_dir.is_dir():
        raise EngineError(
            f"checkpoint {checkpoint_dir} not found; pass --checkpoint DIR (the one the engine was built from)"
        )
    ckpt = Checkpoint.open(checkpoint_dir)
    if ckpt.combined_hash(ckpt.file_hashes()) != manifest.inputs.checkpoint_sha256:
        raise EngineError(
            f"checkpoint {checkpoint_dir} is not the one {engine_dir} was built from (its sha256 differs); "
            "pass --checkpoint DIR with the original"
        )
    recipe = load_recipe(engine_dir / RECIPE)
    reference = LlamaModel.empty(ckpt.config, manifest.limits.max_seq_len, engine.dtype, recipe.plugins)
    load_weights(reference, ckpt)
    reference.to(eval_device(manifest.target.device))
    windows = held_out_windows(engine_dir / TOKENIZER_DIR, NUM_WINDOWS, min(WINDOW, manifest.limits.max_seq_len))
    return compare(reference, engine_logits(engine), windows)

"""Quality of a (quantized) graph against a reference graph on held-out text: the build's gate.

Both models run teacher-forced over the same token windows; reported: perplexity of each, the mean
KL divergence KL(reference || candidate) of the next-token distributions, and top-1 agreement.
The built-in held-out text (llmbuild/data/heldout.txt) is prose of the Python documentation (PSF
License), the held-out part of the demo model's corpus.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.retarget import eval_device
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.builder.weights import load_weights
from llmbuild.errors import EngineError, QualityGateError
from llmbuild.manifest import RECIPE, REPORT, TOKENIZER_DIR, Manifest
from llmbuild.recipe import QualitySection, load_recipe
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.kv_cache import allocate_kv_cache

HELD_OUT = Path(__file__).parents[1] / "data" / "heldout.txt"
EVAL_VERSION = 2
"""Bump when the evaluation changes: cached quality metrics are keyed by it."""
NUM_WINDOWS, WINDOW = 8, 256


@dataclass(frozen=True)
class Quality:
    reference_perplexity: float
    perplexity: float
    mean_kl: float
    top1_agreement: float
    tokens: int


@dataclass(frozen=True)
class StepGraph:
    """A graph under evaluation: `run(inputs, caches)` runs one packed step (inputs in
    manifest.GRAPH_INPUTS order) and returns its logits rows; `new_caches(blocks)` gives empty caches."""

    run: Callable[[tuple[torch.Tensor, ...], list[torch.Tensor]], torch.Tensor]
    new_caches: Callable[[int], list[torch.Tensor]]
    device: torch.device
    block_size: int
    table_width: int | None
    """Block-table columns the graph takes (an engine's max_seq_len / block_size), None: as needed."""
    max_seqs: int
    max_tokens: int


def model_graph(model: LlamaModel, block_size: int = 16) -> StepGraph:
    """The builder's model graph as a StepGraph (on the model's device, no step limits)."""
    cfg, device = model.cfg, model.embed.weight.device

    def new_caches(blocks: int) -> list[torch.Tensor]:
        shape = (blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        return [torch.zeros(shape, dtype=model.kv_cache_dtype(), device=device) for _ in range(2 * cfg.num_layers)]

    def run(inputs: tuple[torch.Tensor, ...], caches: list[torch.Tensor]) -> torch.Tensor:
        return model(*inputs, caches)

    return StepGraph(run, new_caches, device, block_size, None, 1 << 30, 1 << 30)


def engine_graph(engine: Engine) -> StepGraph:
    """A loaded engine's own graph (compiled or eager) as a StepGraph, within the engine's limits."""
    manifest = engine.manifest
    bs = manifest.kv_cache.block_size

    def new_caches(blocks: int) -> list[torch.Tensor]:
        return allocate_kv_cache(manifest.model, blocks, bs, engine.kv_cache_dtype, engine.device)

    limits = manifest.limits
    return StepGraph(
        engine.graph, new_caches, engine.device, bs, math.ceil(limits.max_seq_len / bs), limits.max_batch_size,
        limits.max_num_tokens,
    )  # fmt: skip


def window_logits(
    graph: StepGraph, windows: list[torch.Tensor], on_step: Callable[[], None] = lambda: None
) -> list[torch.Tensor]:
    """Teacher-forced fp32 logits [L, vocab] of each window (all of one length L), computed as the
    runtime computes a generation: each window's first half prefilled (in chunks of the graph's token
    budget), then the second half decoded one token per step, the windows batched together, so
    that the decode kernels (int8 / int4 on quantized activations, decode attention over a
    quantized cache) are what the second half measures. `on_step` is called after each step."""
    length = len(windows[0])
    if any(len(w) != length for w in windows):
        raise ValueError("window_logits needs windows of one length")
    out: list[torch.Tensor] = []
    for first in range(0, len(windows), graph.max_seqs):
        out.extend(_group_logits(graph, torch.stack(windows[first : first + graph.max_seqs]).cpu(), on_step))
    return out


def window_steps(graph: StepGraph, windows: list[torch.Tensor]) -> int:
    """How many steps window_logits runs: per group, each window's prefill chunks, then the decodes."""
    length, steps = len(windows[0]), 0
    for first in range(0, len(windows), graph.max_seqs):
        n, prompt = len(windows[first : first + graph.max_seqs]), max(1, length // 2)
        steps += n * math.ceil(prompt / graph.max_tokens) + length - prompt
    return steps


def _group_logits(graph: StepGraph, group: torch.Tensor, on_step: Callable[[], None]) -> list[torch.Tensor]:
    """window_logits of the windows group [n, L], which the graph takes as one batch."""
    (n, length), bs = group.shape, graph.block_size
    prompt, per_seq = max(1, length // 2), math.ceil(length / bs)
    caches = graph.new_caches(n * per_seq)
    tables = torch.zeros(n, graph.table_width or per_seq, dtype=torch.int32)
    tables[:, :per_seq] = torch.arange(n * per_seq, dtype=torch.int32).reshape(n, per_seq)
    base = torch.arange(n) * per_seq * bs  # sequence b's slot of position p: base[b] + p

    def step(*inputs: torch.Tensor) -> torch.Tensor:
        inputs = (*inputs, torch.zeros(len(inputs[0]), dtype=torch.int32))  # lora_slots: the base weights
        with torch.inference_mode():
            logits = graph.run(tuple(t.to(graph.device) for t in inputs), caches).float().cpu()
        on_step()
        return logits

    rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for b in range(n):
        for start in range(0, prompt, graph.max_tokens):
            pos = torch.arange(start, min(prompt, start + graph.max_tokens))
            m = len(pos)
            ends, cu = torch.tensor([pos[-1] + 1], dtype=torch.int32), torch.tensor([0, m], dtype=torch.int32)
            rows[b].append(step(group[b, pos], pos, base[b] + pos, tables[b : b + 1], ends, cu, torch.arange(m)))
    for p in range(prompt, length):
        pos, lens = torch.full((n,), p), torch.full((n,), p + 1, dtype=torch.int32)
        logits = step(group[:, p], pos, base + p, tables, lens, torch.arange(n + 1, dtype=torch.int32), torch.arange(n))
        for b in range(n):
            rows[b].append(logits[b : b + 1])
    return [torch.cat(r) for r in rows]


def compare(
    reference: LlamaModel | StepGraph,
    candidate: LlamaModel | StepGraph,
    windows: list[torch.Tensor],
    progress: Progress = no_progress,
) -> Quality:
    """Teacher-forced comparison over token windows of one length (each predicts its own tokens 1..L-1),
    both sides run as the runtime runs them (`window_logits`). Each side is a model or a StepGraph.
    `progress` counts the steps of both sides."""
    ref_graph, got_graph = (model_graph(m) if isinstance(m, LlamaModel) else m for m in (reference, candidate))
    total, steps = window_steps(ref_graph, windows) + window_steps(got_graph, windows), itertools.count(1)

    def on_step() -> None:
        progress(next(steps), total)

    nll_ref = nll = kl = agree = 0.0
    count = 0
    for ids, ref_logits, got_logits in zip(
        windows, window_logits(ref_graph, windows, on_step), window_logits(got_graph, windows, on_step), strict=True
    ):
        ref = torch.log_softmax(ref_logits[:-1], -1)
        got = torch.log_softmax(got_logits[:-1], -1)
        target = ids[1:].cpu()
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


def gate_failures(gate: QualitySection, quality: Quality) -> list[str]:
    """One entry per threshold of the recipe's quality section that `quality` misses."""
    failures = []
    if gate.max_kl is not None and quality.mean_kl > gate.max_kl:
        failures.append(f"mean KL {quality.mean_kl:.4g} > quality.max_kl {gate.max_kl:g}")
    if gate.min_top1 is not None and quality.top1_agreement < gate.min_top1:
        failures.append(f"top-1 agreement {quality.top1_agreement:.4f} < quality.min_top1 {gate.min_top1:g}")
    return failures


def check_gate(gate: QualitySection, quality: Quality) -> None:
    """Raise QualityGateError naming every threshold the quantized graph misses."""
    failures = gate_failures(gate, quality)
    if failures:
        raise QualityGateError(
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
    return compare(reference, engine_graph(engine), windows)

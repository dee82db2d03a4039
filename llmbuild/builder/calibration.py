"""Calibration data for AWQ and GPTQ: token windows sampled from a text, deterministically for a seed.

Sources: `builtin` (llmbuild/data/calibration.txt: prose of the Python documentation, PSF License,
from the demo model's training split and disjoint from the held-out text of the quality gate; made
by tools/make_calibration_text.py), a .txt file (paragraphs separated by blank lines) or a .jsonl
file (one JSON object per line with a "text" string). Documents are tokenized one by one (with the
tokenizer's BOS, if it adds one), each followed by EOS, and concatenated; `num_samples` windows of
`seq_len` tokens start at offsets drawn from a generator seeded with `seed` (windows overlap when
the text is shorter than num_samples x seq_len, as in the GPTQ paper's sampling).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from llmbuild.builder.models.llama import LlamaModel, prefill_metadata
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.errors import RecipeError
from llmbuild.recipe import CalibrationSection

BUILTIN = Path(__file__).parents[1] / "data" / "calibration.txt"


def calibration_path(section: CalibrationSection, base_dir: Path) -> Path:
    """The calibration file a section names (relative paths against the recipe's directory), checked."""
    if section.dataset == "builtin":
        return BUILTIN
    path = (base_dir / section.dataset).resolve()
    if path.suffix not in (".txt", ".jsonl"):
        raise RecipeError(
            f"quantization.calibration.dataset: {section.dataset!r} is neither `builtin` nor a .txt / .jsonl file"
        )
    if not path.is_file():
        raise RecipeError(f"quantization.calibration.dataset: file not found: {path}")
    return path


def file_sha256(path: Path) -> str:
    """Content hash of a calibration file (part of the build cache key)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def documents(path: Path) -> list[str]:
    """The documents of a .txt (blank-line separated paragraphs) or .jsonl ({"text": ...} per line) file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"calibration file {path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RecipeError(f'{path}:{number}: expected an object with a "text" string, e.g. {{"text": "..."}}')
        docs.append(record["text"])
    return docs


def calibration_windows(
    section: CalibrationSection, base_dir: Path, tokenizer_dir: Path, progress: Progress = no_progress
) -> torch.Tensor:
    """int64 [num_samples, seq_len] token windows of the calibration text, in the model's tokenizer
    (`progress` counts the documents tokenized)."""
    from transformers import AutoTokenizer

    path = calibration_path(section, base_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids: list[int] = []
    docs = documents(path)
    for done, doc in enumerate(docs, 1):
        ids += tok(doc)["input_ids"] + eos
        progress(done, len(docs))
    if len(ids) < section.seq_len:
        raise RecipeError(
            f"calibration text {path} has {len(ids)} tokens, fewer than quantization.calibration.seq_len "
            f"({section.seq_len}); lower seq_len or give a longer text"
        )
    stream = torch.tensor(ids)
    gen = torch.Generator().manual_seed(section.seed)
    starts = torch.randint(0, len(ids) - section.seq_len + 1, (section.num_samples,), generator=gen)
    return torch.stack([stream[s : s + section.seq_len] for s in starts.tolist()])


class LayerwisePass:
    """Calibration windows run through the decoder one layer at a time, the residual stream between
    layers kept for all windows: a quantizer observes (and changes) layer i before layer i+1 runs.

    Windows go through in chunks of about `chunk_tokens` tokens, each chunk one packed prefill step.
    """

    def __init__(self, model: LlamaModel, windows: torch.Tensor, chunk_tokens: int = 4096, block_size: int = 16):
        self.model = model
        num, seq_len = windows.shape
        per_chunk = max(1, chunk_tokens // seq_len)
        self.chunks = [windows[i : i + per_chunk] for i in range(0, num, per_chunk)]
        cfg = model.cfg
        self.steps = []
        for chunk in self.chunks:
            positions, meta, blocks = prefill_metadata(len(chunk), seq_len, block_size)
            shape = (blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
            caches = tuple(torch.zeros(shape, dtype=model.embed.weight.dtype) for _ in range(2))
            self.steps.append(((positions, model.rope_cos, model.rope_sin), meta, caches))
        with torch.no_grad():
            self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = [
                (model.embed(chunk.flatten()), None) for chunk in self.chunks
            ]

    def run(self, layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layer's outputs for every chunk (forward pre-hooks on its modules see their inputs)."""
        with torch.no_grad():
            return [
                layer(h, residual, rope, *caches, meta)
                for (h, residual), (rope, meta, caches) in zip(self.states, self.steps, strict=True)
            ]

    def advance(self, states: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.states = list(states)

    def final_hidden(self) -> list[torch.Tensor]:
        """Per chunk, the final norm's output after the last layer (the lm_head's input)."""
        with torch.no_grad():
            return [self.model.norm.add(h, residual)[0] for h, residual in self.states if residual is not None]


def observe_inputs(
    modules: Mapping[str, nn.Module], observe: Callable[[str, torch.Tensor], object]
) -> Callable[[], None]:
    """Call observe(name, 2-D input) on every forward of the modules; returns the function removing the hooks."""

    def hook(name: str) -> Callable[..., None]:
        def pre_hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe(name, args[0].reshape(-1, args[0].shape[-1]))  # returns None: the input is left as it is

        return pre_hook

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove

"""Writing an engine directory atomically: everything goes to a hidden sibling directory that is
renamed into place only when complete, so an interrupted or failed build leaves no half-written engine.
Also the files an engine carries besides its graph and weights, and the sealing of the staged tree."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.errors import BuildError, CheckpointError
from llmbuild.manifest import MANIFEST, OP_LIBRARY, RECIPE, TOKENIZER_DIR, UNSEALED, hash_tree
from llmbuild.recipe import Recipe


def check_output_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that is not an llmbuild engine."""
    if out_dir.exists() and not (out_dir.is_dir() and (out_dir / MANIFEST).is_file()):
        if out_dir.is_file() or any(out_dir.iterdir()):
            raise BuildError(f"output {out_dir} exists and is not an llmbuild engine; choose another -o or remove it")


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory next to out_dir; on success swap it into place, else delete it.

    The swap renames an existing engine aside first, so readers see either the old or the new engine.
    """
    out_dir = out_dir.resolve()
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        yield stage
        os.chmod(stage, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "engine")
            os.rename(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def add_runtime_files(stage: Path, op_library: Path, recipe: Recipe, checkpoint: Checkpoint) -> bool:
    """Copy into the staged engine what the runtime loads besides graph and weights: the op library,
    the recipe and the checkpoint's tokenizer (checked to load). Returns whether it has a chat template."""
    (stage / OP_LIBRARY).parent.mkdir()
    shutil.copyfile(op_library, stage / OP_LIBRARY)
    (stage / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
    (stage / TOKENIZER_DIR).mkdir()
    for src in checkpoint.tokenizer_files:
        shutil.copyfile(src, stage / TOKENIZER_DIR / src.name)
    return _check_tokenizer(stage / TOKENIZER_DIR, checkpoint.config.vocab_size)


def seal(stage: Path) -> dict[str, str]:
    """Give the staged files the same permissions whatever the umask (readable by all, writable by the
    owner) and return the sha256 of every file the manifest seals."""
    for path in stage.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return hash_tree(stage, skip=UNSEALED)


def _check_tokenizer(tokenizer_dir: Path, vocab_size: int) -> bool:
    """Load the engine's tokenizer copy as the runtime will; its ids must fit the model's vocabulary.

    Returns whether it has a chat template.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
        raise CheckpointError(f"checkpoint tokenizer does not load ({str(exc).splitlines()[0]})") from None
    if len(tok) > vocab_size:
        raise CheckpointError(f"checkpoint tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}")
    return bool(getattr(tok, "chat_template", None))

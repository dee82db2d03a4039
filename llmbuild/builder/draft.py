"""The draft engine a recipe builds with its target (speculative.draft): the recipe it is built from, and
the checks that it can propose for the target (the same token ids) and cost less than it.

The draft goes through the same plan and build as any engine (builder/plan.py, builder/build.py), into
the target's `draft/` directory (manifest.DRAFT_DIR), where the runtime finds it.
"""

from __future__ import annotations

from typing import Any

from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.errors import CheckpointError, RecipeError
from llmbuild.recipe import DraftSection, QualitySection, Recipe

DRAFT_KEY = "speculative.draft"


def draft_section(recipe: Recipe) -> DraftSection | None:
    """The recipe's built-in draft (None: none, or the runtime's --draft-engine)."""
    return recipe.speculative.draft if recipe.speculative is not None else None


def draft_recipe(recipe: Recipe) -> Recipe:
    """The recipe of the draft of `recipe` (which has one): the target's target (on one rank: a draft runs in
    rank 0's process), limits, KV cache, plugins and CUDA graphs; its own checkpoint and quantization; no
    speculation, no LoRA slots; name `<name>-draft`.

    No quality gate: the output is exactly the target's whatever the draft proposes; a draft's quality only
    sets how many of its proposals are kept, which the runtime measures (and stops proposing where it does
    not pay). Relative paths (checkpoint, calibration text) stay relative to the target's recipe file.
    """
    draft = draft_section(recipe)
    assert draft is not None, "draft_recipe needs a recipe with speculative.draft"
    model = recipe.model.model_copy(update={"checkpoint": draft.checkpoint or recipe.model.checkpoint})
    derived = recipe.model_copy(
        update={
            "name": f"{recipe.name}-draft",
            "model": model,
            "target": recipe.target.model_copy(update={"tensor_parallel": 1}),
            "quantization": draft.quantization,
            "quality": QualitySection(),
            "speculative": None,
            "lora": None,
        }
    )
    derived._base_dir = recipe.base_dir()
    return derived


def check_draft_checkpoint(draft: Recipe) -> None:
    """Refuse a draft checkpoint directory that does not exist, naming its key (not model.checkpoint)."""
    path = draft.checkpoint_dir()
    if not path.is_dir():
        raise RecipeError(f"{DRAFT_KEY}.checkpoint: directory not found: {path} (it is relative to the recipe file)")


def draft_problem(target: Recipe, target_ckpt: Checkpoint, draft: Recipe, draft_ckpt: Checkpoint) -> str | None:
    """Why the draft cannot serve the target (one line naming the key), or None: its token ids must mean the
    target's, and it must not be the target itself (same checkpoint, quantization and dtype: never cheaper)."""
    if draft_ckpt.path.resolve() == target_ckpt.path.resolve():
        if draft.quantization == target.quantization:  # the dtype is the target's (draft_recipe)
            return (
                f"{DRAFT_KEY}: the draft would be the target itself (same checkpoint, quantization and dtype), so it "
                f"cannot propose cheaper than the target checks; set {DRAFT_KEY}.quantization (e.g. {{weights: int4}}) "
                f"or {DRAFT_KEY}.checkpoint (a smaller model with the same tokenizer)"
            )
        return None
    # the wording of the runtime's check of a --draft-engine (runtime/draft_proposer.py draft_mismatch)
    d, t = draft_ckpt.config.vocab_size, target_ckpt.config.vocab_size
    if d != t:
        return f"{DRAFT_KEY}.checkpoint: its vocab_size is {d}, the target's {t}; a draft needs the target's tokenizer"
    if _vocabulary(draft_ckpt) != _vocabulary(target_ckpt):
        return (
            f"{DRAFT_KEY}.checkpoint: its tokenizer's vocabulary differs from the target's (both {d} ids); a draft "
            "needs the target's tokenizer"
        )
    return None


def _vocabulary(checkpoint: Checkpoint) -> dict[str, Any]:
    """Token -> id of the checkpoint's tokenizer, added tokens included, loaded as the runtime loads it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
        raise CheckpointError(f"{checkpoint.path}: tokenizer does not load ({str(exc).splitlines()[0]})") from None
    return dict(tokenizer.get_vocab())

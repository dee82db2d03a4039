"""The speculative-decoding options of `run`, `serve` and `bench`: one definition, one meaning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from llmbuild.recipe import SpeculativeSection


def speculative_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--speculative/--no-speculative`, `--num-speculative-tokens N` and `--draft-engine PATH` to a command."""
    command = click.option(
        "--draft-engine",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="A smaller engine with the same tokenizer that proposes the tokens (speculative method draft; "
        "proposing --num-speculative-tokens, default 4). It runs on rank 0 of a tensor-parallel engine.",
    )(command)
    command = click.option(
        "--num-speculative-tokens",
        type=click.IntRange(1, 16),
        help="Speculative decoding proposing up to N tokens per step: the engine's method, or prompt lookup for an "
        "engine built without a speculative section.",
    )(command)
    return click.option(
        "--speculative/--no-speculative",
        default=None,
        help="Speculative decoding as the engine's recipe set it (default), or off.",
    )(command)


def engine_speculation(
    engine: Path, speculative: bool | None, num_tokens: int | None, draft_engine: Path | None = None
) -> SpeculativeSection | bool:
    """LLMEngine's `speculative` argument for ENGINE under these options."""
    from llmbuild.manifest import Manifest
    from llmbuild.runtime.speculative import speculation_override

    if draft_engine is not None and speculative is False:
        raise click.UsageError("--draft-engine speculates: it cannot go with --no-speculative")
    return speculation_override(Manifest.load(engine).speculative, speculative, num_tokens, draft_engine is not None)

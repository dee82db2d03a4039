"""The speculative-decoding options of `run`, `serve` and `bench`: one definition, one meaning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from llmbuild.recipe import SpeculativeSection


def speculative_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--speculative/--no-speculative` and `--num-speculative-tokens N` to a command."""
    command = click.option(
        "--num-speculative-tokens",
        type=click.IntRange(1, 16),
        help="Prompt-lookup speculative decoding proposing up to N tokens per step (also for an engine built without).",
    )(command)
    return click.option(
        "--speculative/--no-speculative",
        default=None,
        help="Speculative decoding as the engine's recipe set it (default), or off.",
    )(command)


def engine_speculation(engine: Path, speculative: bool | None, num_tokens: int | None) -> SpeculativeSection | bool:
    """LLMEngine's `speculative` argument for ENGINE under these options."""
    from llmbuild.manifest import Manifest
    from llmbuild.runtime.speculative import speculation_override

    return speculation_override(Manifest.load(engine).speculative, speculative, num_tokens)

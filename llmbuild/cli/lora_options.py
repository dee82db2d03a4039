"""`--lora NAME=DIR` of `run` and `serve`: LoRA adapters (PEFT directories) served by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r}: expected NAME=DIR (a name for the adapter, its PEFT directory)")
        if name in adapters:
            raise click.BadParameter(f"adapter name {name!r} is given twice")
        adapters[name] = Path(path)
    return tuple(adapters.items())


def lora_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--lora NAME=DIR` (repeatable) to a command; it receives `lora` as ((name, dir), ...)."""
    return click.option(
        "--lora",
        "lora",
        multiple=True,
        metavar="NAME=DIR",
        callback=_parse,
        help="Serve the LoRA adapter in DIR (Hugging Face PEFT format) as model NAME (repeatable; needs an engine "
        "built with a recipe `lora` section).",
    )(command)

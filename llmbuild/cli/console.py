"""The rich console the commands print to (stdout for results, stderr for progress and notes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A console without syntax highlighting that never wraps lines (output stays greppable)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)

"""How a build shows itself on stderr: rich progress bars with an ETA on a terminal, one plain line per
finished stage elsewhere (CI logs: no escape codes, no redrawn lines)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console

    from llmbuild.builder.stages import ProgressCallback, StageCallback


@contextmanager
def build_progress(err: Console) -> Iterator[tuple[StageCallback, ProgressCallback | None]]:
    """The (on_stage, on_progress) callbacks of one build_engine call, drawing on the stderr console `err`."""
    if not err.is_terminal:
        yield _stage_line, None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bars:
        tasks: dict[str, TaskID] = {}

        def on_stage(name: str, seconds: float | None) -> None:
            if seconds is None:
                # no total until the stage reports one: an indeterminate (pulsing) bar, elapsed time
                tasks[name] = bars.add_task(name, total=None)
                return
            bars.remove_task(tasks.pop(name))
            bars.console.print(f"  [green]done[/] {name:<18} {seconds:7.2f} s")

        def on_progress(name: str, done: int, total: int) -> None:
            if name in tasks:
                bars.update(tasks[name], completed=done, total=total)

        yield on_stage, on_progress


def _stage_line(name: str, seconds: float | None) -> None:
    if seconds is not None:
        click.echo(f"  done {name:<18} {seconds:7.2f} s", err=True)

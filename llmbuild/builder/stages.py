"""A build's stages as the user sees them: timed into report.json, announced to the CLI, and named,
with the likely fix, when they fail."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from llmbuild.errors import BuildError, LLMBuildError

StageCallback = Callable[[str, float | None], None]
"""Called with (stage, None) when a stage starts and (stage, seconds) when it ends."""

ProgressCallback = Callable[[str, int, int], None]
"""Called with (stage, done, total) as a long stage advances (calibration text, AWQ / GPTQ layers,
KV-cache calibration chunks, quality steps); `done` increases up to `total`."""

Progress = Callable[[int, int], None]
"""What a long loop calls with (done, total): `Stages.run` hands out one bound to its stage."""

_OOM_HINT = "out of memory: free memory, or build a smaller model / a shorter limits.max_seq_len"


class Stages:
    """Runs the named stages of one build and keeps their timings (report.json's stages_seconds, in run order)."""

    def __init__(
        self, on_stage: StageCallback | None = None, on_progress: ProgressCallback | None = None, prefix: str = ""
    ) -> None:
        self.timings: dict[str, float] = {}
        self._on_stage: StageCallback = on_stage or _ignore
        self._on_progress = on_progress
        self._prefix = prefix
        """What the callbacks and errors put before a stage's name (a nested build's: `draft: `)."""

    @contextmanager
    def run(self, name: str) -> Iterator[Progress]:
        """Time the body as stage `name`; an unexpected exception becomes a BuildError naming the stage.
        Yields the stage's Progress, for the body's long loops to report through."""
        label = self._prefix + name
        self._on_stage(label, None)
        start = time.perf_counter()
        on_progress = self._on_progress
        try:
            yield no_progress if on_progress is None else partial(on_progress, label)
        except LLMBuildError:
            raise
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BuildError(f"stage '{label}' failed: {type(exc).__name__}: {detail} ({hint(exc)})") from exc
        self.timings[name] = round(time.perf_counter() - start, 3)
        self._on_stage(label, self.timings[name])

    @contextmanager
    def nested(self, prefix: str) -> Iterator[Stages]:
        """The stages of a build inside this one (a built-in draft's): announced and named in errors as
        `<prefix>: <stage>`, and added to this build's timings under those names when the nested build completes."""
        child = Stages(self._on_stage, self._on_progress, f"{self._prefix}{prefix}: ")
        yield child
        self.timings.update({f"{prefix}: {name}": seconds for name, seconds in child.timings.items()})


def hint(exc: Exception) -> str:
    """The likely fix for an exception that escaped a build stage."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text:
        return _OOM_HINT
    if isinstance(exc, OSError):
        return "check free disk space and permissions of the output and cache directories"
    if "triton" in text or "autotuning code block" in text:
        return "a Triton kernel failed to compile for this GPU; rerun with --debug for the kernel and line"
    if "compil" in text or "g++" in text or "c++" in text:
        return "the C++ compiler failed; check that g++ works, then rerun with --debug for its output"
    return "rerun with --debug for the traceback"


def no_progress(done: int, total: int) -> None:
    """The Progress of library calls given no callback: reports nowhere."""


def _ignore(name: str, seconds: float | None) -> None:
    pass

"""User-facing errors: one line that names what is wrong and how to fix it.

The CLI prints `error: <message>` for these and exits non-zero without a traceback;
anything else is an internal error (shown in full with `--debug`).
"""

from __future__ import annotations


class LLMBuildError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class RecipeError(LLMBuildError):
    """The recipe file is malformed, has unknown keys or invalid values."""


class CheckpointError(LLMBuildError):
    """The model checkpoint is missing, corrupt or of an unsupported architecture."""


class BuildError(LLMBuildError):
    """A build stage failed; the message names the stage."""


class EngineError(LLMBuildError):
    """An engine directory is missing, tampered with, or built for another target."""


class RequestError(LLMBuildError):
    """A generation request is invalid for this engine (too long, bad token ids, bad params)."""

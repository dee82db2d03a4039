"""User-facing errors: one line that names what is wrong and how to fix it.

The CLI prints `error: <message>` for these and exits non-zero without a traceback;
anything else is an internal error (shown in full with `--debug`).
"""

from __future__ import annotations


class LLMBuildError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1
    """The CLI's exit status for this error (README, Commands: 1 failed, 2 usage, 3 quality gate)."""


class RecipeError(LLMBuildError):
    """The recipe file (or a --set override) is malformed, has unknown keys or invalid values."""

    exit_code = 2  # a usage error: the command or its recipe needs fixing, not the machine


class CheckpointError(LLMBuildError):
    """The model checkpoint is missing, corrupt or of an unsupported architecture."""


class BuildError(LLMBuildError):
    """A build stage failed; the message names the stage."""


class QualityGateError(BuildError):
    """The quantized weights miss a threshold of the recipe's quality section (compile: no engine was written;
    verify --quality: the engine no longer passes). Exit code 3."""

    exit_code = 3


class EngineError(LLMBuildError):
    """An engine directory is missing, tampered with, or built for another target."""


class SigningError(LLMBuildError):
    """A signing key is missing or malformed, or an engine's signature does not verify."""


class RequestError(LLMBuildError):
    """A generation request is invalid for this engine (too long, bad token ids, bad params)."""


class LoraError(LLMBuildError):
    """A LoRA adapter cannot be loaded into this engine (missing or corrupt files, an unsupported PEFT
    variant, a rank or module the engine has no slots for, shapes of another base model)."""

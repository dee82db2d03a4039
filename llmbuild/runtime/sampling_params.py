"""SamplingParams: how one request chooses its tokens and when it stops. Validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from llmbuild.errors import RequestError
from llmbuild.runtime.structured_output import Grammar


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping options (OpenAI / vLLM semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (divides positive logits, multiplies negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    """Tokens generated before EOS / stop token ids may end the request."""
    skip_special_tokens: bool = True
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives (None = off)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability (the first token has none: nothing precedes it) and
    this many top alternatives at its position (None = off). The prompt is then computed whole,
    never taken from the prefix cache."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling; -100 / 100 ban / force a token."""
    structured: Grammar | None = None
    """Constrain the output to a grammar (runtime/structured_output.py); None = free text."""
    speculate: bool = True
    """Take part in the engine's speculative decoding, if it does any (False: one token per step)."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1 (got {self.max_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be >= 0, 0 = off (got {self.top_k})"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (got {self.min_p})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2] (got {self.presence_penalty})",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2] (got {self.frequency_penalty})",
            ),
            (
                0 <= self.min_tokens <= self.max_tokens,
                f"min_tokens must be in [0, max_tokens={self.max_tokens}] (got {self.min_tokens})",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative integers",
            ),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0 (got {self.logprobs})"),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                f"prompt_logprobs must be >= 0 (got {self.prompt_logprobs})",
            ),
            (
                all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
                "logit_bias maps token ids (>= 0) to biases in [-100, 100]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a logit bias change every step's logits (min_tokens only the first ones)."""
        return self.penalized or bool(self.logit_bias)


class SamplingDefaults(Protocol):
    """An engine's default sampling options: its manifest's `serve` section (recipe.ServeSection)."""

    @property
    def max_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...


def resolve_sampling_params(
    defaults: SamplingDefaults,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_seq_len: int | None = None,
    **options: Any,
) -> SamplingParams:
    """SamplingParams of one request: what it sets, and the engine's defaults for what it leaves None.

    max_tokens, temperature, top_p and top_k fall back to `defaults` (the manifest's `serve`
    section); `max_seq_len`, when given, caps max_tokens (no request can outgrow the engine's
    sequence limit). `options` are the other SamplingParams fields, passed through. Raises
    RequestError for values SamplingParams refuses.
    """
    max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
    return SamplingParams(
        max_tokens=max_tokens if max_seq_len is None else min(max_tokens, max_seq_len),
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else top_k,
        **options,
    )

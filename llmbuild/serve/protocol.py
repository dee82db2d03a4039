"""OpenAI wire format: request bodies (validated strictly) and the response objects built from outputs.

Request models refuse unknown fields and wrong JSON types instead of guessing: a typo such as
`temprature` is a 400 that names it, not a silently ignored setting.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmbuild.runtime.sampler import TokenLogprobs

_INT64 = 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


Prompt = str | list[int]
"""One prompt: text to tokenize, or token ids."""


class GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    """-1 or 0 = off (vLLM accepts both)."""
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=-1000, le=1000)
    """Lower is served first (vLLM's convention); equal priorities are first come, first served."""
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerationRequest:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it out")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop field as a tuple (a string is one stop sequence)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        """The output length the client asked for (None: the engine's default)."""
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives to return with each token's logprob (None: no logprobs)."""
        return None

    @property
    def logprobs_param(self) -> str:
        """The field that asks for top alternatives, as errors name it."""
        return "logprobs"


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported; leave it out or set it to false")
        if self.suffix:
            raise ValueError("suffix is not supported; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) different from n ({self.n}) is not supported")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[Prompt]:
        """The prompt field as a list of prompts (a string, or a list of token ids, is one prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p or isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined; none is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools (function calling) are not supported by this server; leave them out")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def logprobs_param(self) -> str:
        return "top_logprobs"

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and plain-text content."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def describe_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """One line for an OpenAI error body, naming the first offending field, and that field's name."""
    err = exc.errors()[0]
    # union members show up in the location (e.g. prompt.str); keep only the request's own keys
    field = ".".join(str(p) for p in err["loc"] if str(p) not in _UNION_TAGS) or None
    message = str(err["msg"]).removeprefix("Value error, ")
    return (f"{field}: {message}" if field else message), field


_UNION_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "list[TextPart]"}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: int = 400) -> dict:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    """A unique response id such as cmpl-<hex>."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, the `created` field of responses."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """The usage object; cached prompt tokens are reported only when there are some."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


class LogprobsBuilder:
    """Accumulates one choice's logprobs in the completions or the chat format."""

    def __init__(self, decode: Callable[[int], str], chat: bool) -> None:
        self._decode = decode
        self._chat = chat
        self._entries: list[tuple[TokenLogprobs, int]] = []
        self._sent = 0

    def add(self, lp: TokenLogprobs, offset: int) -> None:
        """Record one token's logprobs; `offset` is where its text starts in the choice's text."""
        self._entries.append((lp, offset))

    def body(self) -> dict:
        """Every entry so far (for a whole, non-streamed response)."""
        return self._format(self._entries)

    def take(self) -> dict:
        """The entries added since the last take (for one streamed chunk)."""
        entries, self._sent = self._entries[self._sent :], len(self._entries)
        return self._format(entries)

    def _format(self, entries: list[tuple[TokenLogprobs, int]]) -> dict:
        d = self._decode
        if self._chat:
            return {
                "content": [
                    {
                        "token": (tok := d(lp.token_id)),
                        "logprob": lp.logprob,
                        "bytes": list(tok.encode()),
                        "top_logprobs": [
                            {"token": (t := d(i)), "logprob": v, "bytes": list(t.encode())} for i, v in lp.top
                        ],
                    }
                    for lp, _ in entries
                ]
            }
        return {
            "tokens": [d(lp.token_id) for lp, _ in entries],
            "token_logprobs": [lp.logprob for lp, _ in entries],
            "top_logprobs": [{d(i): v for i, v in lp.top} for lp, _ in entries],
            "text_offset": [offset for _, offset in entries],
        }

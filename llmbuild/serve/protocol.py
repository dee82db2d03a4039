"""OpenAI wire format: request bodies (validated strictly) and the response objects built from outputs.

Known fields refuse wrong JSON types and out-of-range values instead of guessing (a 400 that names
the field). Unknown fields are accepted and ignored, as vLLM does, because OpenAI SDK clients
(LangChain, LiteLLM) send fields such as `metadata`, `store` or vendor extras with every request;
`ignored_fields()` names them so that the server can say so in its log and a response header.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from llmbuild.runtime.structured_output import Grammar
from llmbuild.serve.request_model import RequestModel
from llmbuild.serve.structured import ResponseFormat, StructuredOutputs
from llmbuild.serve.tools import (
    MAX_TOOLS,
    Tool,
    ToolCall,
    ToolCalling,
    check_tool_choice,
    check_tools,
    chosen_function,
    tool_grammar,
)

_INT64 = 2**63


class StreamOptions(RequestModel):
    include_usage: bool = False


Prompt = str | list[int]
"""One prompt: text to tokenize, or token ids."""


class GenerationRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    """0 (with echo or prompt_logprobs): score the prompt, generate nothing."""
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
    speculate: bool = True
    """False: this request takes no part in the engine's speculative decoding (llmbuild extension)."""
    user: str | None = Field(None, max_length=256)
    """The end user's id (OpenAI's abuse monitoring): accepted, not used."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, JSON keys are strings) -> bias in [-100, 100] added to its logit."""
    prompt_logprobs: int | None = Field(None, ge=0)
    """vLLM's extension: each prompt token's logprob and this many top alternatives at its position."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    """vLLM's structured outputs; guided_* are its older names for the same constraints."""
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {value} for token {key}")
        return bias

    @model_validator(mode="after")
    def _generates(self) -> GenerationRequest:
        if self.max_tokens == 0 and not self.scores_prompt:
            raise ValueError(f"max_tokens: 0 generates nothing; it needs {self.scoring_fields} (to score the prompt)")
        constraints = [name for name, g in self._constraints() if g is not None]
        if len(constraints) > 1:
            raise ValueError(f"{constraints[0]}: give one output constraint, not {' and '.join(constraints)}")
        return self

    def _constraints(self) -> list[tuple[str, Grammar | None]]:
        guided = self.guided_json
        return [
            ("response_format", self.response_format.grammar() if self.response_format else None),
            ("structured_outputs", self.structured_outputs.to_grammar() if self.structured_outputs else None),
            ("guided_json", None if guided is None else Grammar.json_schema(guided)),
            ("guided_regex", None if self.guided_regex is None else Grammar("regex", self.guided_regex)),
            ("guided_choice", None if self.guided_choice is None else Grammar.choice(self.guided_choice)),
            ("guided_grammar", None if self.guided_grammar is None else Grammar("grammar", self.guided_grammar)),
        ]

    @property
    def grammar(self) -> tuple[str, Grammar] | None:
        """The output constraint and the field that asked for it (None: free text)."""
        return next(((name, g) for name, g in self._constraints() if g is not None), None)

    @property
    def scores_prompt(self) -> bool:
        """The response carries the prompt's logprobs."""
        return self.prompt_logprobs is not None

    @property
    def scoring_fields(self) -> str:
        """The fields that ask for the prompt's logprobs, as errors name them."""
        return "prompt_logprobs"

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top alternatives at each prompt position the engine must compute (None: no prompt scoring)."""
        return self.prompt_logprobs

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs."""
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

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

    @property
    def tool_calling(self) -> ToolCalling | None:
        """How the answers are read for tool calls (None: they are not)."""
        return None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) different from n ({self.n}) is not supported")
        return self

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("insertion (text after the completion) is not supported; leave suffix out")
        return suffix

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def scores_prompt(self) -> bool:
        return self.echo or self.prompt_logprobs is not None

    @property
    def scoring_fields(self) -> str:
        return "echo: true or prompt_logprobs"

    @property
    def num_prompt_logprobs(self) -> int | None:
        # echo with logprobs returns the prompt tokens' logprobs in the logprobs field
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    def prompts(self) -> list[Prompt]:
        """The prompt field as a list of prompts (a string, or a list of token ids, is one prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p or isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant message's calls (its content may then be null)."""
    tool_call_id: str | None = None
    """A tool message's: the call it answers."""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages carry them, not {self.role} messages")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined; none is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template takes it: role and plain-text content, and its tool calls (the
        arguments as objects) or the id of the call it answers when it has them."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    """none, auto (the default with tools), required, or {"type": "function", "function": {"name"}}."""
    parallel_tool_calls: bool = True
    """With required or a named function: one call or several (auto: the first call only when false)."""

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        check_tool_choice(choice)
        return choice

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        check_tools(self.tools or [], self.tool_choice)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "function"]:
        """How the answer may call tools: not at all, if the model likes, always, or the named function."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, dict):
            return "function"
        return "required" if self.tool_choice == "required" else "auto"

    @property
    def tool_calling(self) -> ToolCalling | None:
        """How the answers are read for tool calls (None: they are not)."""
        if self.tool_mode == "none":
            return None
        return ToolCalling(frozenset(t.function.name for t in self.tools or []), self.parallel_tool_calls)

    def _constraints(self) -> list[tuple[str, Grammar | None]]:
        others = super()._constraints()
        grammar = None
        if self.tools and self.tool_mode in ("required", "function"):
            grammar = tool_grammar(self.tools, chosen_function(self.tool_choice), self.parallel_tool_calls)
        elif self.tools and self.tool_mode == "auto" and self._strict and not any(g for _, g in others):
            # strict functions under auto: text, or calls whose arguments match (a response_format wins)
            grammar = tool_grammar(self.tools, None, self.parallel_tool_calls, free_text=True)
        return [("tools", grammar), *others]

    @property
    def _strict(self) -> bool:
        return any(t.function.strict for t in self.tools or [])

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (None: no tools)."""
        return [t.for_template() for t in self.tools] if self.tools else None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def logprobs_param(self) -> str:
        return "top_logprobs"

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (ChatMessage.for_template)."""
        return [m.for_template() for m in self.messages]


class TokenizeRequest(RequestModel):
    """POST /tokenize, vLLM's shape: a text `prompt`, or chat `messages` through the engine's chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    """Add the tokenizer's special tokens (BOS): default true for a prompt, false for messages."""
    add_generation_prompt: bool = True
    """With messages: end with the template's opening of an assistant turn."""
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    """With messages: the tools the template renders, as chat completions would send them."""
    return_token_strs: bool = False
    """Also return each token's string (`token_strs`)."""

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (text) or messages (chat), not both or neither")
        if self.tools and self.messages is None:
            raise ValueError("tools: only with messages (the chat template renders them)")
        check_tools(self.tools or [], None)
        if self.messages is not None and self.add_special_tokens:
            # the template writes the special tokens itself; adding BOS again would double it
            raise ValueError("add_special_tokens: true is not supported with messages (the chat template adds them)")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (ChatMessage.for_template)."""
        return [m.for_template() for m in self.messages or []]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (None: no tools)."""
        return [t.for_template() for t in self.tools] if self.tools else None


class DetokenizeRequest(RequestModel):
    """POST /detokenize, vLLM's shape: token ids back to text."""

    model: str | None = None
    tokens: list[int]


def describe_validation_error(exc: ValidationError, fields: Collection[str] = ()) -> tuple[str, str | None]:
    """One line for an OpenAI error body, naming the first offending field, and that field's name.

    A check across fields (a model validator) has no location: its message starts with the field it
    refuses, which becomes the error's `param` when it is one of `fields`.
    """
    err = exc.errors()[0]
    # union members show up in the location (e.g. prompt.str); keep only the request's own keys
    field = ".".join(str(p) for p in err["loc"] if str(p) not in _UNION_TAGS) or None
    message = str(err["msg"]).removeprefix("Value error, ")
    if field is None:
        first = re.match(r"[a-z_]+", message)
        return message, first.group() if first and first.group() in fields else None
    return f"{field}: {message}", field


_UNION_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "list[TextPart]"}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: int = 400) -> dict:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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

"""Choice: one choice of a response as its outputs arrive, and the usage of a whole response."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llmbuild.runtime.llm_engine import RequestOutput
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve import protocol
from llmbuild.serve.logprobs import LogprobsBuilder, prompt_logprobs_body
from llmbuild.serve.tools import ToolCallParser


@dataclass(frozen=True, slots=True)
class PromptEcho:
    """What a choice returns of its prompt: the prompt text first (`echo`), the prompt's logprobs in the
    logprobs field (echo with logprobs), and vLLM's `prompt_logprobs` with `prompt_logprobs` top tokens."""

    token_ids: list[int]
    decode: Callable[[int], str]
    """One token's text (the tokenizer's)."""
    text: str | None = None
    """The prompt text to echo (None: no echo)."""
    prompt_logprobs: int | None = None


@dataclass
class Choice:
    """The text, token count, finish reason and logprobs of one choice so far."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: LogprobsBuilder | None = None
    offset: int = 0
    """Characters of text so far: where the next token's text starts (logprobs' text_offset)."""
    prompt: PromptEcho | None = None
    generates: bool = True
    """False for max_tokens 0: the one token the engine had to sample is not part of the choice."""
    prompt_logprobs: list[dict[str, dict] | None] | None = None
    """vLLM's prompt_logprobs, once the first output brought them."""
    tools: ToolCallParser | None = None
    """A chat choice that may call tools: its text read for calls."""

    def reported_finish_reason(self) -> str | None:
        """The finish reason clients see: "tool_calls" when the choice made calls and stopped on its own."""
        if self.tools is not None and self.tools.calls and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason

    def add(self, out: RequestOutput) -> str:
        """Append one step's output; returns the text it adds to the choice (the echoed prompt first)."""
        piece = "" if self.text else self._add_prompt(out)  # every output appends to text
        self.finish_reason = out.finish_reason
        if not self.generates:
            self.text.append(piece)
            return piece
        self.num_tokens += 1
        if self.logprobs is not None and out.logprobs is not None:
            self.logprobs.add(out.logprobs, self.offset)
        self.text.append(piece + out.text)
        self.offset += len(out.text)
        return piece + out.text

    def _add_prompt(self, out: RequestOutput) -> str:
        """On the first output: the echoed prompt text and logprobs, and vLLM's prompt_logprobs."""
        prompt = self.prompt
        if prompt is None:
            return ""
        scored = out.prompt_logprobs
        if scored is not None and prompt.prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs_body(prompt.token_ids, scored, prompt.prompt_logprobs, prompt.decode)
        if prompt.text is None:
            return ""
        if self.logprobs is not None and scored is not None:
            self.logprobs.add_prompt(prompt.token_ids, scored)
        self.offset = len(prompt.text)
        return prompt.text


def usage(requests: list[EngineRequest], choices: list[Choice], n: int) -> dict:
    """Usage of a response whose requests are n consecutive choices per prompt."""
    # the n choices of a prompt share it: count each prompt once, as OpenAI does
    firsts = requests[::n]
    prompt_tokens = sum(r.num_prompt_tokens for r in firsts)
    cached = sum(r.num_cached_tokens for r in firsts)
    return protocol.usage(prompt_tokens, sum(c.num_tokens for c in choices), cached)

"""Choice: one choice of a response as its outputs arrive, and the usage of a whole response."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmbuild.runtime.llm_engine import RequestOutput
from llmbuild.runtime.request import Request as EngineRequest
from llmbuild.serve import protocol
from llmbuild.serve.protocol import LogprobsBuilder


@dataclass
class Choice:
    """The text, token count, finish reason and logprobs of one choice so far."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: LogprobsBuilder | None = None
    offset: int = 0
    """Characters of text so far: where the next token's text starts (logprobs' text_offset)."""

    def add(self, out: RequestOutput) -> None:
        """Append one step's output."""
        self.num_tokens += 1
        if self.logprobs is not None and out.logprobs is not None:
            self.logprobs.add(out.logprobs, self.offset)
        self.text.append(out.text)
        self.offset += len(out.text)
        self.finish_reason = out.finish_reason


def usage(requests: list[EngineRequest], choices: list[Choice], n: int) -> dict:
    """Usage of a response whose requests are n consecutive choices per prompt."""
    # the n choices of a prompt share it: count each prompt once, as OpenAI does
    firsts = requests[::n]
    prompt_tokens = sum(r.num_prompt_tokens for r in firsts)
    cached = sum(r.num_cached_tokens for r in firsts)
    return protocol.usage(prompt_tokens, sum(c.num_tokens for c in choices), cached)

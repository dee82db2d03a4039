"""Request: one sequence's state as it moves waiting -> running -> finished."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from llmbuild.runtime.logprobs import TokenLogprobs
from llmbuild.runtime.sampling_params import SamplingParams

_arrival_order = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the engine's max_seq_len
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """A prompt, its sampling parameters and the progress of its generation.

    Invariants: 0 <= num_computed_tokens <= num_tokens; the KV cache holds exactly the first
    num_computed_tokens tokens, in block_ids (ceil(num_computed_tokens / block_size) blocks or more).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """params.max_tokens, clamped so that prompt + output fits the engine's max_seq_len."""
    generator: torch.Generator | None = None
    """Own random stream when params.seed is set, so results do not depend on the batch."""
    priority: int = 0
    """Lower is served first; equal priorities are served in arrival order (FCFS)."""
    arrival: int = field(default_factory=lambda: next(_arrival_order))
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    """Content hashes of this request's first full blocks of tokens (see BlockPool), filled lazily."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache on (the latest) admission, not computed."""
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    """With params.prompt_logprobs: entry i scores prompt token i (entry 0 is None), filled as the
    prompt's chunks are computed (runtime/llm_engine.py)."""
    matcher: Any = None
    """With params.structured: the grammar's llguidance matcher, fed every sampled token."""
    num_draft_tokens: int = 0
    """Tokens proposed for this request by speculative decoding (runtime/speculative.py)."""
    num_accepted_tokens: int = 0
    """Proposed tokens kept (each one a token this request got without a step of its own)."""
    acceptance_rate: float = 0.5
    """Running share of its proposals kept (a neutral start: two verifications that accept nothing pause it);
    below the engine's threshold it stops proposing for a while."""
    speculation_paused_until: int = 0
    """No proposals until the output has this many tokens."""
    lora: Any = None
    """The LoRA adapter the request runs with (runtime/lora_manager.ServedAdapter), None: the base weights."""
    lora_slot: int = 0
    """The slot its adapter holds this step (set by LoraManager.assign; 0: none)."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"
        assert 1 <= self.max_tokens <= self.params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

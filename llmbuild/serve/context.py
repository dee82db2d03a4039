"""ServeContext: what every handler of the app reads, passed to each explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingDefaults
from llmbuild.serve import protocol
from llmbuild.serve.async_engine import AsyncEngine
from llmbuild.serve.config import ServeConfig


@dataclass
class ServerState:
    """What changes while the server runs (server.py's signal handler writes it)."""

    draining: bool = False
    """Set on SIGTERM: in-flight requests finish, new ones get 503."""


@dataclass(frozen=True, slots=True)
class ServeContext:
    """The engine, the limits and the names one server's handlers need; fixed for the app's life."""

    engine: AsyncEngine
    config: ServeConfig
    state: ServerState
    model_name: str
    """The name clients give in `model`."""
    max_seq_len: int
    vocab_size: int
    """Token ids run from 0 to vocab_size - 1 (the model's embedding rows)."""
    max_prompt_tokens: int
    """Longest prompt accepted: the config's cap, within the engine's max_seq_len - 1."""
    defaults: SamplingDefaults
    """Sampling defaults for what a request leaves unset (the manifest's `serve` section)."""
    tokenizer: Any
    """The engine's transformers tokenizer."""
    started: int
    """Unix seconds when the app was made (the model's `created`)."""

    @classmethod
    def create(cls, engine: AsyncEngine, config: ServeConfig, state: ServerState | None = None) -> ServeContext:
        """The context of a server of `engine` under `config`."""
        manifest = engine.llm.engine.manifest
        max_seq_len = manifest.limits.max_seq_len
        return cls(
            engine=engine,
            config=config,
            state=state or ServerState(),
            model_name=config.model_name or manifest.name,
            max_seq_len=max_seq_len,
            vocab_size=manifest.model.vocab_size,
            max_prompt_tokens=min(config.max_prompt_tokens or max_seq_len - 1, max_seq_len - 1),
            defaults=manifest.serve,
            tokenizer=engine.llm.tokenizer,
            started=protocol.now(),
        )

    @property
    def llm(self) -> LLMEngine:
        return self.engine.llm

    def adapter_names(self) -> list[str]:
        """The LoRA adapters served besides the base model, by name (registered at start-up or since)."""
        loras = self.llm.loras
        return sorted(loras.adapters) if loras is not None else []

    def decode(self, token_id: int) -> str:
        """One token's text (for logprobs)."""
        return self.tokenizer.decode([token_id])

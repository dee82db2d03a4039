"""ServeConfig: how `llmbuild serve` listens and the limits it enforces on every request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """Listening address, API keys and per-request caps. Safe by default: loopback only, bounded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | None = None
    """Name clients use in `model` (default: the engine's name)."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens; empty = no authentication."""
    public_probes: bool = False
    """Let /ready and /metrics answer without a key (/health always does), for probes and scrapers."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Longest prompt accepted (default: the engine's max_seq_len - 1)."""
    max_n: int = Field(8, ge=1)
    max_prompts: int = Field(16, ge=1)
    """Most prompts in one /v1/completions request (a list prompt)."""
    max_top_logprobs: int = Field(20, ge=0)
    """Most top alternatives per token (logprobs, top_logprobs, prompt_logprobs)."""
    max_logit_bias: int = Field(300, ge=0)
    """Most entries in one request's logit_bias (OpenAI's limit)."""
    max_stop: int = Field(8, ge=0)
    max_stop_len: int = Field(256, ge=1)
    max_queue: int = Field(256, ge=0)
    """Requests that may wait for a batch slot beyond the running batch; more get 429."""
    shutdown_timeout: float = Field(30.0, ge=0)
    """Seconds SIGTERM waits for in-flight requests before cutting them off."""
    enable_prefix_caching: bool = True
    allow_adapter_loading: bool = False
    """Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read any directory the server can)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or one JSON object per line (the per-request line's fields as keys)."""

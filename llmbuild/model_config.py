"""The architecture description an engine carries: what the runtime needs to size caches and check inputs.

Builder code derives it from a Hugging Face config.json; the runtime reads it from the manifest.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
KV_CACHE_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
"""What a KV cache may hold: the model dtypes, or int8 / fp8 (e4m3) codes with per-head scales."""


class RopeConfig(BaseModel):
    """Rotary position embedding: base frequency and optional frequency scaling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    theta: float = Field(gt=0)
    scaling: Literal["none", "linear", "llama3"] = "none"
    factor: float = Field(1.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int | None = None

    @model_validator(mode="after")
    def _llama3_needs_context(self) -> RopeConfig:
        if self.scaling == "llama3" and not self.original_max_position_embeddings:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
        return self


class ModelConfig(BaseModel):
    """Shape and options of one decoder-only transformer of the Llama family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    rms_norm_eps: float = Field(gt=0)
    rope: RopeConfig
    max_position_embeddings: int = Field(ge=1)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _gqa(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self

    @cached_property
    def num_params(self) -> int:
        """Parameter count (embedding and lm_head counted once each; once in all when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    def kv_bytes_per_token(self, kv_dtype: torch.dtype) -> int:
        """Bytes of K and V cache one token occupies across all layers."""
        itemsize = torch.empty((), dtype=kv_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

"""Hugging Face checkpoints of the Llama family: config parsing and shard-by-shard tensor reading.

Weights are read one shard at a time through safetensors' memory map, so a build never holds
the whole checkpoint in memory next to the engine's own copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from llmbuild.errors import CheckpointError
from llmbuild.manifest import sha256_file, sha256_json
from llmbuild.model_config import DTYPES, ModelConfig, RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json")
_DTYPE_ALIASES = {
    "float": "float32",
    "half": "float16",
    "bfloat": "bfloat16",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
}


@dataclass(frozen=True)
class Checkpoint:
    """An opened, validated Hugging Face checkpoint directory."""

    path: Path
    config: ModelConfig
    dtype: str
    """Dtype the weights are stored in (config `dtype` / `torch_dtype`)."""
    sliding_window: int | None
    shards: tuple[Path, ...]
    tokenizer_files: tuple[Path, ...]
    """Tokenizer files plus config.json, so that AutoTokenizer resolves the same class from the copy."""
    raw_config: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Validate the directory, parse config.json and locate shards and tokenizer files."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint directory not found: {path} (model.checkpoint is relative to the recipe)"
            )
        raw = _read_json(path / "config.json", what="config.json")
        gen_path = path / "generation_config.json"
        gen = _read_json(gen_path, what=gen_path.name) if gen_path.is_file() else None
        config, dtype, window = parse_hf_config(raw, gen, source=path / "config.json")
        shards = _find_shards(path)
        tok = tuple(path / f for f in TOKENIZER_FILES if (path / f).is_file()) + (path / "config.json",)
        if not any(p.name in _TOKENIZER_MODELS for p in tok):
            raise CheckpointError(
                f"{path}: no tokenizer found (expected one of {', '.join(_TOKENIZER_MODELS)}); "
                "save it next to the weights with tokenizer.save_pretrained(dir)"
            )
        return cls(path, config, dtype, window, shards, tok, raw)

    def input_files(self) -> list[Path]:
        """Every file the build reads, for the input hash."""
        files = [*self.shards, *self.tokenizer_files]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
        return sorted(set(files))

    def file_hashes(self) -> dict[str, str]:
        return {p.relative_to(self.path).as_posix(): sha256_file(p) for p in self.input_files()}

    @staticmethod
    def combined_hash(file_hashes: dict[str, str]) -> str:
        return sha256_json(file_hashes)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one shard at a time, memory-mapped; truncated files fail with their name."""
        for shard in self.shards:
            try:
                with safe_open(str(shard), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CheckpointError(
                    f"checkpoint file {shard.name} is corrupt or truncated ({str(exc).splitlines()[0]}); "
                    "re-download or re-save the checkpoint"
                ) from None


def parse_hf_config(
    raw: dict[str, Any], generation: dict[str, Any] | None = None, source: Path | str = "config.json"
) -> tuple[ModelConfig, str, int | None]:
    """ModelConfig, stored dtype and sliding window from a Hugging Face config (old and transformers-5 keys)."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        bias = bool(raw.get("attention_bias", False))
        config = ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            qkv_bias=True if arch == "Qwen2ForCausalLM" else bias,
            o_bias=False if arch == "Qwen2ForCausalLM" else bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(raw.get("bos_token_id")),
            eos_token_ids=_eos_ids(raw, generation),
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: required key {exc.args[0]!r} is missing") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise CheckpointError(f"{source}: invalid model config: {where + ': ' if where else ''}{message}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid value: {str(exc).splitlines()[0]}") from None
    return config, _parse_dtype(raw, source), _sliding_window(raw, arch)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes rope_parameters = {rope_type, rope_theta, ...}; older versions write
    # rope_theta at the top level and an optional rope_scaling = {type | rope_type, factor, ...}.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=merged["factor"])
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            scaling="llama3",
            factor=merged["factor"],
            low_freq_factor=merged.get("low_freq_factor", 1.0),
            high_freq_factor=merged.get("high_freq_factor", 4.0),
            original_max_position_embeddings=merged["original_max_position_embeddings"],
        )
    raise ValueError(f"rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _parse_dtype(raw: dict[str, Any], source: Path | str) -> str:
    value = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    value = _DTYPE_ALIASES.get(str(value).removeprefix("torch."), str(value).removeprefix("torch."))
    if value not in DTYPES:
        raise CheckpointError(f"{source}: dtype {value!r} is not supported (float32, float16, bfloat16)")
    return value


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    if arch == "MistralForCausalLM":
        return raw.get("sliding_window")
    layer_types = raw.get("layer_types") or []
    if raw.get("use_sliding_window") or "sliding_attention" in layer_types:
        return raw.get("sliding_window")
    return None


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (raw, generation or {}):
        v = src.get("eos_token_id")
        for i in v if isinstance(v, list) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {what} is missing (not a Hugging Face checkpoint?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _find_shards(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, what="model.safetensors.index.json")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        shards = tuple(path / name for name in sorted(set(weight_map.values())))
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{index}: lists shard {shard.name}, which is missing")
        return shards
    single = path / "model.safetensors"
    if single.is_file():
        return (single,)
    if any(path.glob("*.bin")) or any(path.glob("*.pth")):
        raise CheckpointError(
            f"{path}: only pickle weights (.bin/.pth) found; llmbuild reads safetensors only "
            "(convert with model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

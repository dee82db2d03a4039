"""Shared fixtures: tiny local checkpoints (one tokenizer trained per session) and cached engines."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# Triton kernels run under Triton's interpreter where there is no GPU (CI): the switch is read when
# triton is first imported, which the builder's imports (torch._inductor) do.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from llmbuild.builder.build import build_engine
from llmbuild.machine import cpu_flags
from llmbuild.plugins import load_plugins
from llmbuild.plugins.library import ISAS, compiled_isas, use_isa
from llmbuild.recipe import load_recipe
from llmbuild.testing.checkpoints import make_checkpoint, train_tokenizer

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=512,
    initializer_range=0.3,  # peaked logits, so greedy comparisons are not decided by rounding noise
)

ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(architecture="LlamaForCausalLM"),
    "llama3_rope": dict(
        architecture="LlamaForCausalLM",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_tied": dict(architecture="LlamaForCausalLM", tie_word_embeddings=True),
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=None),
    "qwen2": dict(architecture="Qwen2ForCausalLM"),
    "qwen3": dict(architecture="Qwen3ForCausalLM"),
}


@pytest.fixture(scope="session", autouse=True)
def op_library() -> None:
    """Build (first run on a machine) and load the C++ op library once per session."""
    load_plugins()


@pytest.fixture(params=list(ISAS))
def kernel_isa(request: pytest.FixtureRequest):
    """Runs a test at each kernel tier (csrc/isa.h) this CPU can execute; the others skip with the reason."""
    name = request.param
    if name not in compiled_isas():
        missing = sorted(ISAS[name] - cpu_flags())
        reason = f"this CPU lacks {', '.join(missing)}" if missing else "the native op library was built without it"
        pytest.skip(f"kernel tier {name}: {reason}")
    with use_isa(name):
        yield name


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    # a few ids below vocab_size: some tokenizer classes (Qwen2's) add a special token of their own
    train_tokenizer(out, vocab_size=TINY["vocab_size"] - 16)
    return out


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., Path]:
    """make_ckpt(name, architecture=..., dtype=..., **config) -> checkpoint dir (cached by name)."""
    cache: dict[str, Path] = {}

    def make(name: str, architecture: str = "LlamaForCausalLM", dtype: str = "float32", **config: Any) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{name}")
            cache[name] = make_checkpoint(
                out, architecture, dtype=dtype, tokenizer_from=tokenizer_dir, **{**TINY, **config}
            )
        return cache[name]

    return make


def write_recipe(path: Path, checkpoint: Path, **sections: Any) -> Path:
    """Write a recipe YAML; `sections` override/extend the defaults (e.g. limits={...})."""
    recipe: dict[str, Any] = {
        "name": path.stem,
        "model": {"checkpoint": str(checkpoint), "dtype": "float32"},
        "target": {"backend": "eager"},
        "limits": {"max_batch_size": 8, "max_seq_len": 256, "max_num_tokens": 256},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build cache private to this test session."""
    return tmp_path_factory.mktemp("build-cache")


@pytest.fixture(scope="session")
def make_engine(tmp_path_factory: pytest.TempPathFactory, build_cache: Path) -> Callable[..., Path]:
    """make_engine(name, checkpoint, **recipe sections) -> engine dir (built once per session per name)."""
    cache: dict[str, Path] = {}

    def make(name: str, checkpoint: Path, **sections: Any) -> Path:
        if name not in cache:
            root = tmp_path_factory.mktemp(f"engine-{name}")
            recipe = write_recipe(root / f"{name}.yaml", checkpoint, **sections)
            cache[name] = build_engine(load_recipe(recipe), root / "engine", cache_dir=build_cache).engine_dir
        return cache[name]

    return make


@pytest.fixture(scope="session")
def llama_engine(make_ckpt, make_engine) -> Path:
    """The default tiny fp32 Llama engine most runtime and CLI tests share."""
    return make_engine("llama", make_ckpt("llama"))


@pytest.fixture(scope="session")
def demo_engine(make_engine) -> Path:
    """The trained demo model (models/demo) in fp32: it continues text the way its prompt goes, so speculative
    decoding's proposals get accepted (a random-weight model accepts almost none)."""
    return make_engine("trained-demo", Path(__file__).parents[1] / "models" / "demo", model={"dtype": "float32"})


@pytest.fixture
def engine_copy(llama_engine: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny engine that a test may tamper with."""
    dst = tmp_path / "engine"
    shutil.copytree(llama_engine, dst)
    return dst


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(data))

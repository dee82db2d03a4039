"""Limits resolved against the checkpoint: unset ones from the model (capped), explicit ones checked;
the resolved values are what the plan, the engine and its manifest record."""

from __future__ import annotations

import pytest
import yaml

from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.plan import DEFAULT_MAX_SEQ_LEN, make_plan, resolve_limits
from llmbuild.errors import RecipeError
from llmbuild.manifest import RECIPE, Manifest
from llmbuild.memory_plan import GPU_OVERHEAD_BYTES, HOST_OVERHEAD_BYTES
from llmbuild.recipe import EngineLimits, LimitsSection, load_recipe
from tests.conftest import write_recipe


def test_an_unset_max_seq_len_is_the_models_positions_capped(make_ckpt):
    cfg = Checkpoint.open(make_ckpt("llama")).config  # 512 positions
    assert resolve_limits(LimitsSection(), cfg, None).max_seq_len == 512
    assert resolve_limits(LimitsSection(), cfg, 128).max_seq_len == 128  # within the sliding window
    long = Checkpoint.open(make_ckpt("llama-long", max_position_embeddings=32768)).config
    assert resolve_limits(LimitsSection(), long, None).max_seq_len == DEFAULT_MAX_SEQ_LEN
    explicit = resolve_limits(LimitsSection(max_seq_len=300, max_batch_size=2, max_num_tokens=64), cfg, None)
    assert explicit == EngineLimits(max_seq_len=300, max_batch_size=2, max_num_tokens=64)


def test_an_explicit_max_seq_len_beyond_the_model_fails(make_ckpt):
    cfg = Checkpoint.open(make_ckpt("llama")).config
    with pytest.raises(RecipeError, match=r"limits.max_seq_len \(1024\) exceeds .* \(512\); lower it to at most 512"):
        resolve_limits(LimitsSection(max_seq_len=1024), cfg, None)


def test_the_plan_holds_the_resolved_recipe_and_sizes_cuda_against_the_gpu(make_ckpt, tmp_path):
    ckpt = make_ckpt("llama")
    cpu = make_plan(load_recipe(write_recipe(tmp_path / "c.yaml", ckpt, limits={"max_seq_len": None})), 1 << 30)
    assert cpu.limits.max_seq_len == 512 and cpu.recipe.limits == cpu.limits
    assert yaml.safe_load(cpu.recipe.to_yaml())["limits"]["max_seq_len"] == 512
    assert cpu.memory.overhead_bytes == HOST_OVERHEAD_BYTES
    cuda_recipe = load_recipe(write_recipe(tmp_path / "g.yaml", ckpt, target={"device": "cuda"}))
    cuda = make_plan(cuda_recipe, 3 << 30, build_machine=False)
    assert cuda.available_bytes == 3 << 30 and cuda.memory.overhead_bytes == GPU_OVERHEAD_BYTES
    assert cuda.memory.activation_bytes == cpu.memory.activation_bytes  # same step, same model dtype
    assert cuda.shortfall() is None
    short = make_plan(cuda_recipe, 1 << 30, build_machine=False).shortfall()
    assert short is not None and "of GPU memory available: short by" in short


def test_an_engine_records_the_resolved_limits(make_ckpt, make_engine):
    engine = make_engine("limits-default", make_ckpt("llama"), limits={"max_seq_len": None})
    assert Manifest.load(engine).limits.max_seq_len == 512
    assert yaml.safe_load((engine / RECIPE).read_text())["limits"]["max_seq_len"] == 512

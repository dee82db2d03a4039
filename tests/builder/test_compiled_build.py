"""Compiled (AOTInductor) engines: layout, target record, reproducibility, eager fallback."""

from __future__ import annotations

import pytest

from llmbuild.builder.build import build_engine
from llmbuild.errors import EngineError
from llmbuild.machine import native_isa
from llmbuild.manifest import Manifest
from llmbuild.recipe import load_recipe
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.conftest import write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled_engine(make_ckpt, make_engine):
    return make_engine("llama-compiled", make_ckpt("llama"), target={"backend": "compiled"})


def test_compiled_engine_layout_and_target(compiled_engine):
    m = Manifest.load(compiled_engine)
    assert m.target.backend == "compiled"
    assert {"rank0/model.pt2", "rank0/exported.pt2", "rank0/weights.safetensors"} <= set(m.files)
    # compiled with -march=native: the engine requires this CPU's vector extensions, recorded by name
    assert m.target.required_isa == native_isa() and len(m.target.required_isa) > 0
    assert "llmbuild::linear" in m.plugins and "llmbuild::paged_attention" in m.plugins


def test_rebuild_without_cache_is_byte_identical(make_ckpt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama"), target={"backend": "compiled"}))
    a = build_engine(recipe, tmp_path / "a", cache_dir=tmp_path / "cache").engine_dir
    b = build_engine(recipe, tmp_path / "b", cache_dir=tmp_path / "cache", use_cache=False).engine_dir
    for rel in ("manifest.json", "rank0/model.pt2", "rank0/exported.pt2", "rank0/weights.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_eager_fallback_of_a_compiled_engine_gives_the_same_tokens(compiled_engine):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(20, 60))]
    compiled = LLMEngine.from_dir(compiled_engine).generate(prompts, params)
    eager = LLMEngine.from_dir(compiled_engine, backend="eager").generate(prompts, params)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]


def test_an_eager_engine_cannot_run_compiled(llama_engine):
    with pytest.raises(EngineError, match="no compiled package"):
        Engine.load(llama_engine, backend="compiled")

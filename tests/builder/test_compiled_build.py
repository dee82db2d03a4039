"""Compiled (AOTInductor) engines: layout, target record, reproducibility, eager fallback."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch._inductor import aoti_load_package

from llmbuild.builder.build import build_engine
from llmbuild.builder.compile import compile_graph
from llmbuild.cpu_target import fitting_level, resolve
from llmbuild.errors import EngineError
from llmbuild.machine import cpu_flags
from llmbuild.manifest import OP_LIBRARY, Manifest
from llmbuild.plugins.library import compiled_isas, loaded_library, use_isa
from llmbuild.recipe import load_recipe
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.conftest import write_recipe
from tests.helpers import SmallConstants

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled_engine(make_ckpt, make_engine):
    return make_engine("llama-compiled", make_ckpt("llama"), target={"backend": "compiled"})


def test_compiled_engine_layout_and_target(compiled_engine):
    m = Manifest.load(compiled_engine)
    assert m.target.backend == "compiled"
    assert {"rank0/model.pt2", "rank0/exported.pt2", "rank0/weights.safetensors", "ops/llmbuild_ops.so"} <= set(m.files)
    # target.cpu native: the engine requires the build CPU's extensions, recorded by name, and its CPU name
    native = resolve("native")
    assert m.target.cpu == "native" and m.target.cpu_resolved == native.resolved
    assert m.target.required_isa == native.features and len(m.target.required_isa) > 0
    assert "llmbuild::linear" in m.plugins and "llmbuild::paged_attention" in m.plugins


def test_rebuild_without_cache_is_byte_identical(make_ckpt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama"), target={"backend": "compiled"}))
    a = build_engine(recipe, tmp_path / "a", cache_dir=tmp_path / "cache").engine_dir
    b = build_engine(recipe, tmp_path / "b", cache_dir=tmp_path / "cache", use_cache=False).engine_dir
    # use_cache=False compiles the op library again too: equal bytes from two compiles
    for rel in ("manifest.json", "rank0/model.pt2", "rank0/exported.pt2", "rank0/weights.safetensors", OP_LIBRARY):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_eager_fallback_of_a_compiled_engine_gives_the_same_tokens(compiled_engine):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(20, 60))]
    compiled = LLMEngine.from_dir(compiled_engine).generate(prompts, params)
    eager = LLMEngine.from_dir(compiled_engine, backend="eager").generate(prompts, params)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]


def test_a_package_takes_every_weight_from_outside_even_the_small_ones(tmp_path):
    # one package serves every checkpoint of its shape (the build cache reuses it): it must compute with
    # the weights it is handed, not the values it was compiled from
    model, x = SmallConstants(), torch.randn(3, 16)
    path = tmp_path / "model.pt2"
    compile_graph(torch.export.export(model, (x,)), path, resolve("native"))
    package = aoti_load_package(str(path))
    assert sorted(package.get_constant_fqns()) == sorted(model.state_dict())
    others = {name: torch.randn_like(value) for name, value in model.state_dict().items()}
    package.load_constants(others, check_full_update=True, user_managed=True)
    torch.testing.assert_close(package(x), torch.func.functional_call(model, others, (x,)))


def test_an_eager_engine_cannot_run_compiled(llama_engine):
    with pytest.raises(EngineError, match="no compiled package"):
        Engine.load(llama_engine, backend="compiled")


# Portable engines: target.cpu names the CPU the engine is for, not the build machine.


def _zmm_instructions(so: Path) -> int:
    """AVX-512 instructions (any use of a zmm register or an opmask write) in a shared library's code."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True).stdout
    return sum(1 for line in text.splitlines() if "%zmm" in line or "%k1" in line)


@pytest.fixture(scope="module")
def v3_engine(make_ckpt, make_engine):
    return make_engine("llama-v3", make_ckpt("llama"), target={"backend": "compiled", "cpu": "x86-64-v3"})


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64-v3 is an x86-64 target")
def test_an_avx2_target_records_its_cpu_and_carries_no_avx512_code(v3_engine, tmp_path):
    m = Manifest.load(v3_engine)
    assert m.target.cpu == m.target.cpu_resolved == "x86-64-v3" and m.target.kernel_isa == "avx2"
    assert m.target.required_isa == resolve("x86-64-v3").features
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is needed to read the compiled code")
    with zipfile.ZipFile(v3_engine / "rank0" / "model.pt2") as package:
        packaged = [name for name in package.namelist() if name.endswith(".so")]
        assert packaged, "the AOTInductor package holds no shared library"
        package.extractall(tmp_path, members=packaged)
    for so in [v3_engine / "ops" / "llmbuild_ops.so", *(tmp_path / name for name in packaged)]:
        assert _zmm_instructions(so) == 0, f"{so.name} holds AVX-512 instructions"
    # the check itself sees AVX-512 code where there is some: the native library of an AVX-512 machine
    if "avx512" in compiled_isas():
        assert _zmm_instructions(loaded_library()) > 0


def test_an_avx2_engine_gives_the_native_engines_tokens(v3_engine, compiled_engine):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(20, 60))]
    # this process holds the native op library: run it at the engine's tier, as its own library would
    with use_isa(Manifest.load(v3_engine).target.kernel_isa):
        portable = LLMEngine.from_dir(v3_engine).generate(prompts, params)
    native = LLMEngine.from_dir(compiled_engine).generate(prompts, params)
    assert [p.token_ids for p in portable] == [n.token_ids for n in native]


def test_an_engine_runs_on_a_machine_without_a_compiler(v3_engine, tmp_path):
    """A serving host: no c++/g++ on PATH, CXX unset, empty llmbuild and Inductor caches."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(
        PATH=str(Path(sys.executable).parent),  # the venv's scripts: python, no compiler
        LLMBUILD_CACHE_DIR=str(cache),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
    )
    assert shutil.which("c++", path=env["PATH"]) is None and shutil.which("g++", path=env["PATH"]) is None
    cmd = [sys.executable, "-m", "llmbuild.cli", "run", str(v3_engine), "--prompt-ids", "[5, 6, 7, 8]"]
    cmd += ["--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--output", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = LLMEngine.from_dir(v3_engine).generate([[5, 6, 7, 8]], params)[0].token_ids
    assert json.loads(result.stdout)["token_ids"] == expected
    assert list(cache.rglob("*")) == []  # nothing was built


def _target_this_cpu_cannot_run() -> str | None:
    candidates = ("sapphirerapids", "x86-64-v4") if platform.machine() == "x86_64" else ()
    return next((name for name in candidates if resolve(name).missing_on(cpu_flags())), None)


def test_a_target_beyond_the_build_machine_builds_and_is_refused_where_it_cannot_run(make_ckpt, make_engine):
    name = _target_this_cpu_cannot_run()
    if name is None:
        pytest.skip("this CPU runs every candidate target (sapphirerapids, x86-64-v4)")
    engine = make_engine(f"llama-{name}", make_ckpt("llama"), target={"cpu": name})
    missing = resolve(name).missing_on(cpu_flags())
    report = json.loads((engine / "report.json").read_text())["op_library"]
    # the build says how it checked what it could not run
    assert report["target_cpu"] == name and report["checks_ran_kernel_isa"] == compiled_isas()[0]
    assert f"cannot execute target.cpu={name} (it lacks {', '.join(missing)})" in report["note"]
    with pytest.raises(EngineError) as exc:
        Engine.load(engine)
    assert f"which needs CPU features this machine lacks: {', '.join(missing)}" in str(exc.value)
    assert f"rebuild it with target.cpu: {fitting_level(cpu_flags())} (runs here) or native" in str(exc.value)

from __future__ import annotations

import json

import pytest
import torch

import llmbuild
from llmbuild.builder import build as build_module
from llmbuild.builder.build import build_engine
from llmbuild.builder.plan import make_plan
from llmbuild.errors import BuildError, RecipeError
from llmbuild.manifest import FORMAT_VERSION, Manifest, sha256_file
from llmbuild.plugins import OP_VERSIONS
from llmbuild.recipe import load_recipe
from tests.conftest import write_recipe


def test_engine_layout_and_manifest(llama_engine, make_ckpt):
    files = sorted(p.relative_to(llama_engine).as_posix() for p in llama_engine.rglob("*") if p.is_file())
    for expected in (
        "manifest.json",
        "recipe.yaml",
        "report.json",
        "rank0/exported.pt2",
        "rank0/weights.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/chat_template.jinja",
    ):
        assert expected in files
    m = Manifest.load(llama_engine)
    assert m.format_version == FORMAT_VERSION
    assert m.llmbuild_version == llmbuild.__version__ and m.torch_version == torch.__version__
    assert m.target.device == "cpu" and m.target.backend == "eager" and m.target.tensor_parallel == 1
    assert m.model.architecture == "LlamaForCausalLM" and m.model.num_layers == 2
    assert m.plugins == OP_VERSIONS and {"llmbuild::paged_attention", "llmbuild::linear"} <= set(m.plugins)
    # every file but the manifest and the report is sealed by its sha256
    assert set(m.files) == set(files) - {"manifest.json", "report.json"}
    for rel, digest in m.files.items():
        assert sha256_file(llama_engine / rel) == digest
    ckpt = make_ckpt("llama")
    assert m.inputs.checkpoint_files["model.safetensors"] == sha256_file(ckpt / "model.safetensors")
    assert (llama_engine / "tokenizer" / "chat_template.jinja").read_text() == (
        ckpt / "chat_template.jinja"
    ).read_text()
    report = json.loads((llama_engine / "report.json").read_text())
    assert {"plan", "package"} <= set(report["stages_seconds"])
    assert report["built_at"] and report["sizes_bytes"]["rank0/weights.safetensors"] > 0
    # weights are not inside the graph archive
    assert "rank0/model.pt2" not in files  # an eager engine has no compiled package
    assert (llama_engine / "rank0/exported.pt2").stat().st_size < (
        llama_engine / "rank0/weights.safetensors"
    ).stat().st_size


def test_rebuild_is_byte_identical(make_ckpt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama")))
    a = build_engine(recipe, tmp_path / "a", cache_dir=tmp_path / "cache").engine_dir
    b = build_engine(recipe, tmp_path / "b", cache_dir=tmp_path / "cache", use_cache=False).engine_dir
    for rel in ("manifest.json", "provenance.json", "rank0/exported.pt2", "rank0/weights.safetensors", "recipe.yaml"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_build_cache_reuses_stages_by_what_they_depend_on(make_ckpt, tmp_path):
    cache = tmp_path / "cache"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama")))
    first = build_engine(recipe, tmp_path / "a", cache_dir=cache).report["stages_seconds"]
    assert {"load weights", "export"} <= set(first)
    again = build_engine(recipe, tmp_path / "b", cache_dir=cache).report["stages_seconds"]
    assert {"weights (cached)", "graph (cached)"} <= set(again) and "export" not in again
    # same architecture, other weights: the graph is reused, the weights are not
    other = load_recipe(write_recipe(tmp_path / "o.yaml", make_ckpt("llama-seed1", seed=1)))
    stages = build_engine(other, tmp_path / "c", cache_dir=cache).report["stages_seconds"]
    assert "graph (cached)" in stages and "load weights" in stages
    # other limits: the weights are reused (same RoPE table length), the graph is not
    longer_batch = load_recipe(write_recipe(tmp_path / "l.yaml", make_ckpt("llama"), limits={"max_batch_size": 4}))
    stages = build_engine(longer_batch, tmp_path / "d", cache_dir=cache).report["stages_seconds"]
    assert "weights (cached)" in stages and "export" in stages
    # --no-cache runs everything
    stages = build_engine(recipe, tmp_path / "e", cache_dir=cache, use_cache=False).report["stages_seconds"]
    assert not any(name.endswith("(cached)") for name in stages)


def test_failed_build_leaves_no_engine_and_keeps_the_old_one(make_ckpt, tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama")))
    out = tmp_path / "engines" / "x"
    build_engine(recipe, out, cache_dir=tmp_path / "cache")
    before = (out / "manifest.json").read_bytes()

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk exploded")

    monkeypatch.setattr(build_module, "save_graph", broken_save)
    # an empty build cache, so the graph is saved again (use_cache=False would also recompile the op library)
    with pytest.raises(BuildError, match="stage 'save graph' failed: RuntimeError: disk exploded"):
        build_engine(recipe, out, cache_dir=tmp_path / "empty-cache")
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(BuildError):
        build_engine(recipe, tmp_path / "engines" / "fresh", cache_dir=tmp_path / "empty-cache")
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["x"]  # no staging leftovers


def test_refuses_to_replace_a_directory_that_is_not_an_engine(make_ckpt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama")))
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    with pytest.raises(BuildError, match="exists and is not an llmbuild engine"):
        build_engine(recipe, out)
    assert (out / "thesis.txt").exists()


def test_max_seq_len_beyond_the_model_is_refused(make_ckpt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama"), limits={"max_seq_len": 4096}))
    with pytest.raises(RecipeError, match=r"limits.max_seq_len \(4096\) exceeds the model's max_position_embeddings"):
        build_engine(recipe, tmp_path / "e")


def test_tensor_parallel_splits_are_checked_by_the_plan(make_ckpt, tmp_path):
    ckpt = make_ckpt("llama")  # 4 heads, 2 kv heads, intermediate 128
    recipe = write_recipe(tmp_path / "r.yaml", ckpt, target={"tensor_parallel": 3})
    with pytest.raises(RecipeError, match=r"tensor_parallel=3 cannot split this model: num_attention_heads \(4\)"):
        make_plan(load_recipe(recipe))
    int4 = write_recipe(
        tmp_path / "q.yaml",
        ckpt,
        target={"tensor_parallel": 2},
        quantization={"weights": "int4", "group_size": 32},
    )
    with pytest.raises(RecipeError, match=r"with target.tensor_parallel=2, int4 .* layers\.0\.attn\.o \(K=32\)"):
        make_plan(load_recipe(int4))


def test_sliding_window_shorter_than_max_seq_len_is_not_supported_yet(make_ckpt, tmp_path):
    ckpt = make_ckpt("mistral-window", architecture="MistralForCausalLM", sliding_window=64)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", ckpt))
    with pytest.raises(RecipeError, match="not supported yet: sliding-window attention"):
        build_engine(recipe, tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "error,hint",
    [
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"),
            "out of memory",
        ),
        (MemoryError(), "out of memory"),
        (OSError(28, "No space left on device"), "free disk space"),
    ],
)
def test_a_failing_stage_is_named_with_its_likely_fix(make_ckpt, tmp_path, monkeypatch, error, hint):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama")))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(build_module, "load_weights", fail)
    with pytest.raises(BuildError) as exc:
        build_engine(recipe, tmp_path / "e", cache_dir=tmp_path / "cache")  # empty: the weights are loaded
    assert "stage 'load weights' failed" in str(exc.value) and hint in str(exc.value)
    assert not (tmp_path / "e").exists()

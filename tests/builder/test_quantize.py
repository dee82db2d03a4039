"""Weight quantization (int8, int4; W8A8: int8 weights and activations): the graph on the trained demo model
quantized engines build, store quantized weights and generate like the bf16 engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from llmbuild.builder.build import build_engine
from llmbuild.builder.cache import config_hash
from llmbuild.builder.plan import make_plan
from llmbuild.builder.quality import compare
from llmbuild.builder.quant_format import Int4Linear, ScaledLinear
from llmbuild.builder.quantize import quantize_model
from llmbuild.errors import BuildError, RecipeError
from llmbuild.manifest import Manifest
from llmbuild.recipe import QuantizationSection, load_recipe
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.builder.quantization_fixtures import DEMO, W8A8_DEMO, demo_model
from tests.conftest import write_recipe
from tests.helpers import GREEDY, first_token_agreement, random_prompt, teacher_forced_logits


@pytest.fixture(scope="module")
def windows() -> list[torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(DEMO)
    ids = tok((DEMO / "validation.txt").read_text())["input_ids"]
    return [torch.tensor(ids[i : i + 128]) for i in range(0, 8 * 128, 128)]


def test_int8_rtn_stays_close_to_bf16_on_held_out_text(windows):
    reference, candidate = demo_model(), demo_model()
    names = quantize_model(candidate, QuantizationSection(weights="int8"))
    assert len(names) == 4 * candidate.cfg.num_layers  # qkv, o, gate_up, down; the tied lm_head stays
    assert all(isinstance(candidate.get_submodule(n), ScaledLinear) for n in names)
    assert all(candidate.get_submodule(n).weight.dtype == torch.int8 for n in names)
    q = compare(reference, candidate, windows)
    assert q.tokens == 8 * 127
    assert q.mean_kl < 0.02 and q.top1_agreement > 0.9
    assert q.perplexity == pytest.approx(q.reference_perplexity, rel=0.05)
    # the comparison can tell models apart: a crude 8-level quantization is far worse
    crude = demo_model()
    for module in crude.modules():
        if isinstance(module, torch.nn.Linear):
            scale = module.weight.abs().amax() / 4
            module.weight.data = (module.weight / scale).round().clamp(-4, 4) * scale
    assert compare(reference, crude, windows).mean_kl > 5 * q.mean_kl


def test_int4_rtn_stays_close_to_bf16_and_further_than_int8(windows):
    reference, int8, int4 = demo_model(), demo_model(), demo_model()
    quantize_model(int8, QuantizationSection(weights="int8"))
    names = quantize_model(int4, QuantizationSection(weights="int4", group_size=64))
    assert all(isinstance(int4.get_submodule(n), Int4Linear) for n in names) and len(names) == 16
    q4, q8 = compare(reference, int4, windows), compare(reference, int8, windows)
    assert q4.mean_kl < 0.1 and q4.top1_agreement > 0.8
    assert q4.perplexity == pytest.approx(q4.reference_perplexity, rel=0.1)
    assert q4.mean_kl > 2 * q8.mean_kl  # 16 levels lose more than 255: the metrics see it


def test_int4_group_size_must_divide_every_quantized_layer():
    # the demo MLP's input size is 704 = 11 x 64: group 128 cannot split it
    with pytest.raises(RecipeError, match=r"group_size 128 .* layers\.0\.mlp\.down \(K=704\).*exclude"):
        quantize_model(demo_model(), QuantizationSection(weights="int4", group_size=128))
    names = quantize_model(demo_model(), QuantizationSection(weights="int4", group_size=128, exclude=("*.down",)))
    assert len(names) == 12


def test_exclude_patterns_keep_layers_in_model_dtype():
    model = demo_model()
    names = quantize_model(model, QuantizationSection(weights="int8", exclude=("layers.0.*", "*.down")))
    assert not any(n.startswith("layers.0.") or n.endswith(".down") for n in names)
    assert isinstance(model.get_submodule("layers.0.attn.qkv"), torch.nn.Linear)
    assert isinstance(model.get_submodule("layers.1.attn.qkv"), ScaledLinear)


def test_int8_engine_stores_int8_weights_and_generates_like_bf16(make_engine):
    bf16 = make_engine("demo-bf16", DEMO, model={"dtype": "bfloat16"})
    int8 = make_engine("demo-int8", DEMO, model={"dtype": "bfloat16"}, quantization={"weights": "int8"})
    with safe_open(int8 / "rank0" / "weights.safetensors", "pt") as f:
        assert f.get_tensor("layers.0.mlp.down.weight").dtype == torch.int8
        assert f.get_tensor("layers.0.mlp.down.scales").dtype == torch.bfloat16
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
    size = (int8 / "rank0" / "weights.safetensors").stat().st_size
    assert size < 0.7 * (bf16 / "rank0" / "weights.safetensors").stat().st_size
    assert first_token_agreement(bf16, int8) >= 0.85


def test_int4_engine_stores_packed_weights_and_generates_like_bf16(make_engine):
    bf16 = make_engine("demo-bf16", DEMO, model={"dtype": "bfloat16"})
    int4 = make_engine(
        "demo-int4",
        DEMO,
        model={"dtype": "bfloat16"},
        quantization={"weights": "int4", "group_size": 64},
        quality={"max_kl": 0.1, "min_top1": 0.8},
    )
    with safe_open(int4 / "rank0" / "weights.safetensors", "pt") as f:
        w = f.get_tensor("layers.0.mlp.down.weight")
        assert w.dtype == torch.uint8 and tuple(w.shape) == (256, 704 // 2)
        assert f.get_tensor("layers.0.mlp.down.scales").shape == (256, 704 // 64)
        assert f.get_tensor("layers.0.mlp.down.mins").dtype == torch.bfloat16
    report = json.loads((int4 / "report.json").read_text())["quality"]
    assert 0 < report["mean_kl"] < 0.1 and report["top1_agreement"] > 0.8
    # 12-token prompts run the decode-sized (VNNI, int8 activations) path of the int4 op
    assert first_token_agreement(bf16, int4) >= 0.75


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_int4_engines_record_their_calibration_and_generate_like_bf16(make_engine, method):
    bf16 = make_engine("demo-bf16", DEMO, model={"dtype": "bfloat16"})
    engine = make_engine(
        f"demo-int4-{method}",
        DEMO,
        model={"dtype": "bfloat16"},
        quantization={
            "weights": "int4",
            "group_size": 64,
            "method": method,
            "calibration": {"num_samples": 16, "seq_len": 256, "seed": 0},
        },
        quality={"max_kl": 0.05, "min_top1": 0.85},
    )
    report = json.loads((engine / "report.json").read_text())
    assert report["calibration"]["dataset"] == "builtin" and report["calibration"]["num_samples"] == 16
    assert len(report["calibration"]["sha256"]) == 64
    assert f"quantize ({method})" in report["stages_seconds"]
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["inputs"]["calibration_sha256"] == report["calibration"]["sha256"]
    assert 0 < report["quality"]["mean_kl"] < 0.05
    assert first_token_agreement(bf16, engine) >= 0.75


def test_w8a8_engine_stores_int8_weights_records_its_format_and_passes_the_gate(make_engine):
    engine = make_engine("demo-w8a8-compiled", DEMO, **W8A8_DEMO)
    with safe_open(engine / "rank0" / "weights.safetensors", "pt") as f:
        assert f.get_tensor("layers.0.attn.qkv.weight").dtype == torch.int8
        assert f.get_tensor("layers.0.attn.qkv.scales").dtype == torch.bfloat16
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
    manifest = json.loads((engine / "manifest.json").read_text())
    q = manifest["quantization"]
    assert (q["weights"], q["activations"], q["method"], q["smoothquant_alpha"]) == ("int8", "int8", "smoothquant", 0.5)
    assert manifest["plugins"]["llmbuild::linear_w8a8"] == 1
    report = json.loads((engine / "report.json").read_text())
    assert "quantize (smoothquant)" in report["stages_seconds"] and len(report["calibration"]["sha256"]) == 64
    assert 0 < report["quality"]["mean_kl"] < 0.02 and report["quality"]["top1_agreement"] > 0.9
    with LLMEngine.from_dir(engine) as llm:  # prefill and decode steps through the compiled W8A8 op
        (done,) = llm.generate([random_prompt(40, seed=1, vocab=4096)], SamplingParams(max_tokens=8, **GREEDY))
    assert len(done.token_ids) == 8


def test_the_graph_cache_tells_w8a8_from_int8_weight_only(llama_engine, make_ckpt, tmp_path):
    # same tensors, another op: another graph; smoothing changes values only: the same graph
    target = Manifest.load(llama_engine).target
    sections = {
        "int8": {"weights": "int8"},
        "w8a8": {"weights": "int8", "activations": "int8"},
        "w8a8-smoothquant": {"weights": "int8", "activations": "int8", "method": "smoothquant"},
    }
    hashes, sizes = {}, set()
    for name, quantization in sections.items():
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", make_ckpt("llama"), quantization=quantization))
        plan = make_plan(recipe)
        hashes[name] = config_hash(recipe, plan, target)
        sizes.add(plan.memory.weight_bytes)
    assert hashes["int8"] != hashes["w8a8"] == hashes["w8a8-smoothquant"]
    assert len(sizes) == 1


def test_w8a8_composes_with_an_int8_kv_cache_and_tensor_parallelism(llama_engine, make_ckpt, make_engine):
    # a row-parallel rank quantizes its own input columns per token (its own absmax), so two ranks round
    # otherwise than one: their logits must be as close to the unquantized engine's, not equal to one rank's
    sections = {
        "quantization": {
            "weights": "int8",
            "activations": "int8",
            "method": "smoothquant",
            "kv_cache": "int8",
            "calibration": {"num_samples": 8, "seq_len": 64},
        }
    }
    one = make_engine("llama-w8a8-kv-int8", make_ckpt("llama"), **sections)
    many = make_engine("llama-w8a8-kv-int8-tp2", make_ckpt("llama"), target={"tensor_parallel": 2}, **sections)
    prompt, forced = random_prompt(40, seed=3), random_prompt(12, seed=4)
    logits = {}
    for name, engine in (("fp32", llama_engine), ("tp1", one), ("tp2", many)):
        with LLMEngine.from_dir(engine) as llm:
            logits[name] = teacher_forced_logits(llm, prompt, forced)
    ref = logits["fp32"]
    error = {name: ((logits[name] - ref).abs().mean() / ref.std()).item() for name in ("tp1", "tp2")}
    assert 0 < error["tp1"] < 0.1 and error["tp2"] < 1.25 * error["tp1"], error
    agreement = (logits["tp2"].argmax(-1) == logits["tp1"].argmax(-1)).float().mean().item()
    assert agreement >= 0.9


def test_quality_gate_reports_metrics_and_fails_the_build_when_missed(make_engine, build_cache, tmp_path):
    engine = make_engine(
        "demo-int8-gated",
        DEMO,
        model={"dtype": "bfloat16"},
        quantization={"weights": "int8"},
        quality={"min_top1": 0.5},
    )
    report = json.loads((engine / "report.json").read_text())["quality"]
    assert report["top1_agreement"] > 0.9 and 0 < report["mean_kl"] < 0.02 and report["tokens"] > 1000
    assert report["perplexity"] == pytest.approx(report["reference_perplexity"], rel=0.05)
    for attempt in ("fresh", "cached"):  # the second build reuses the cached weights and their metrics
        recipe = write_recipe(
            tmp_path / f"strict-{attempt}.yaml",
            DEMO,
            model={"dtype": "bfloat16"},
            quantization={"weights": "int8"},
            quality={"max_kl": 1e-9, "min_top1": 0.9999},
        )
        out = tmp_path / f"engine-{attempt}"
        with pytest.raises(BuildError, match=r"quality gate failed: mean KL .* > quality.max_kl 1e-09; top-1"):
            build_engine(load_recipe(recipe), out, cache_dir=build_cache, use_cache=attempt == "cached")
        assert not out.exists()


@pytest.mark.parametrize(
    "name,sections",
    [  # the same engines as the tests above build
        ("demo-int8", {"quantization": {"weights": "int8"}}),
        (
            "demo-int4",
            {"quantization": {"weights": "int4", "group_size": 64}, "quality": {"max_kl": 0.1, "min_top1": 0.8}},
        ),
        # as tests/runtime/test_rank_workers.py builds it: every rank's weights count
        ("demo-int8-tp2", {"quantization": {"weights": "int8"}, "target": {"tensor_parallel": 2}}),
        (
            "demo-kv-int8-tp2",
            {
                "quantization": {"kv_cache": "int8", "calibration": {"num_samples": 16, "seq_len": 256}},
                "target": {"tensor_parallel": 2},
            },
        ),
    ],
)
def test_plan_sizes_quantized_weights_as_the_engine_stores_them(make_engine, tmp_path, name, sections):
    engine = make_engine(name, DEMO, model={"dtype": "bfloat16"}, **sections)
    tensors = []
    for weights in sorted(engine.glob("rank*/weights.safetensors")):
        with safe_open(weights, "pt") as f:
            tensors += [f.get_tensor(k) for k in f.keys() if not k.startswith("rope_")]  # RoPE tables: not weights
    recipe = write_recipe(tmp_path / "r.yaml", DEMO, model={"dtype": "bfloat16"}, **sections)
    assert make_plan(load_recipe(recipe)).memory.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)


def test_int4_group_misfit_fails_the_plan(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", DEMO, quantization={"weights": "int4", "group_size": 128})
    with pytest.raises(RecipeError, match=r"group_size 128 .* layers\.0\.mlp\.down \(K=704\)"):
        make_plan(load_recipe(recipe))


def test_fp8_on_the_demo_model_sits_between_int8_and_int4(windows):
    # fp8 engines need a GPU; the builder's quality gate runs the CPU kernel, which emulates the fp8 GEMM:
    # e4m3 weights and dynamic per-tensor e4m3 activations, products accumulated in fp32
    reference, fp8, fp8_tensor, int8, int4 = (demo_model() for _ in range(5))
    names = quantize_model(fp8, QuantizationSection(weights="fp8"))
    assert all(isinstance(fp8.get_submodule(n), ScaledLinear) for n in names) and len(names) == 16
    assert fp8.get_submodule(names[0]).weight.dtype == torch.float8_e4m3fn
    quantize_model(fp8_tensor, QuantizationSection(weights="fp8", fp8_scales="tensor"))
    assert fp8_tensor.get_submodule(names[0]).scales.shape == (1,)
    quantize_model(int8, QuantizationSection(weights="int8"))
    quantize_model(int4, QuantizationSection(weights="int4", group_size=64))
    models = {"fp8": fp8, "fp8 tensor": fp8_tensor, "int8": int8, "int4": int4}
    kl = {name: compare(reference, m, windows).mean_kl for name, m in models.items()}
    assert kl["int8"] < kl["fp8"] < kl["int4"]
    assert kl["fp8"] < 0.02
    assert kl["fp8"] <= kl["fp8 tensor"] < kl["int4"]  # one scale per matrix: coarser, still 3 mantissa bits


def test_fp8_scales_apply_to_fp8_weights_only():
    with pytest.raises(ValueError, match="fp8_scales=tensor applies to fp8 weights"):
        QuantizationSection(weights="int8", fp8_scales="tensor")

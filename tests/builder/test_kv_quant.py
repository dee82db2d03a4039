"""INT8 KV cache: per-head scales calibrated on the demo model, the quantized graph close to bf16,
and int8-KV engines that build, plan half the cache bytes and generate like the bf16 engine."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from llmbuild.builder.kv_quant import kv_absmax, quantize_kv_cache
from llmbuild.builder.models.llama import LlamaModel, prefill_metadata
from llmbuild.builder.plan import make_plan
from llmbuild.builder.quality import compare, engine_graph, window_logits
from llmbuild.manifest import Manifest
from llmbuild.recipe import load_recipe
from llmbuild.runtime.engine import Engine
from llmbuild.runtime.llm_engine import LLMEngine
from tests.builder.quantization_fixtures import (
    DEMO,
    SMALL_CALIBRATION,
    demo_model,
    sequence_logits,
    small_calibration,
)
from tests.conftest import write_recipe
from tests.helpers import first_token_agreement, random_prompt, teacher_forced_logits

KV_INT8 = {"kv_cache": "int8", "calibration": SMALL_CALIBRATION.model_dump()}
# steps of at most 64 tokens: the quality gate and the runtime prefill 256-token windows in chunks
SECTIONS = {
    "model": {"dtype": "bfloat16"},
    "quantization": KV_INT8,
    "quality": {"max_kl": 0.01},
    "limits": {"max_num_tokens": 64, "max_batch_size": 16},
}


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return small_calibration()


def cached_codes(model: LlamaModel, windows: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's K and V cache after prefilling the windows in one step (int8 when quantized)."""
    cfg = model.cfg
    positions, meta, blocks = prefill_metadata(len(windows), windows.shape[1], 16)
    shape = (blocks, cfg.num_kv_heads, 16, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=model.kv_cache_dtype()) for _ in range(2 * cfg.num_layers)]
    with torch.inference_mode():
        no_adapters = torch.zeros(windows.numel(), dtype=torch.int32)
        model(windows.flatten(), positions, *meta, torch.zeros(1, dtype=torch.int64), no_adapters, caches)
    return caches


def test_each_heads_calibrated_maximum_is_stored_as_127(calibration):
    model = demo_model()
    absmax = kv_absmax(model, calibration)
    assert absmax.shape == (model.cfg.num_layers, 2, model.cfg.num_kv_heads)
    plain = cached_codes(model, calibration)
    for i, cache in enumerate(plain):  # the same maxima, measured on one step over all windows
        assert torch.equal(cache.abs().float().amax(dim=(0, 2, 3)), absmax[i // 2, i % 2])
    quantize_kv_cache(model, absmax)
    assert model.kv_cache_dtype() == torch.int8
    heads = model.cfg.num_kv_heads
    for i, cache in enumerate(cached_codes(model, calibration)):
        top = cache.abs().amax(dim=(0, 2, 3))
        assert cache.dtype == torch.int8
        if i < 2:  # layer 0 sees the calibration inputs: each head's maximum lands on the grid's edge
            assert top.tolist() == [127] * heads
        else:  # later layers see the (slightly different) outputs of quantized-cache attention
            assert (top >= 120).all(), top


def with_outlier_head(model: LlamaModel, factor: float = 16.0) -> LlamaModel:
    """The same function with kv head 0's keys `factor` x larger and its query heads' queries that
    much smaller (q . k unchanged; RoPE rotates within a head, so it commutes with the scaling)."""
    cfg = model.cfg
    d, q_rows = cfg.head_dim, cfg.num_heads * cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    for layer in model.layers:
        w = layer.attn.qkv.weight.data
        w[q_rows : q_rows + d] *= factor
        w[: group * d] /= factor
    return model


def test_int8_kv_stays_close_to_bf16_and_per_head_scales_survive_an_outlier_head(calibration, held_out):
    reference = demo_model()
    model = demo_model()
    quantize_kv_cache(model, kv_absmax(model, calibration))
    q = compare(reference, model, held_out)
    assert 0 < q.mean_kl < 0.005 and q.top1_agreement > 0.95
    assert q.perplexity == pytest.approx(q.reference_perplexity, rel=0.01)

    outlier_reference = with_outlier_head(demo_model())
    assert compare(reference, outlier_reference, held_out).mean_kl < 1e-3  # the function is the same
    per_head = copy.deepcopy(outlier_reference)
    absmax = kv_absmax(per_head, calibration)
    quantize_kv_cache(per_head, absmax)
    per_tensor = copy.deepcopy(outlier_reference)
    quantize_kv_cache(per_tensor, absmax.amax(dim=2, keepdim=True).expand_as(absmax).contiguous())
    q_head, q_tensor = compare(outlier_reference, per_head, held_out), compare(outlier_reference, per_tensor, held_out)
    assert q_head.mean_kl < 2 * q.mean_kl  # the loud head costs the others nothing
    assert q_tensor.mean_kl > 3 * q_head.mean_kl  # one scale for all heads: the quiet heads lose their bits


def test_fp8_kv_lands_each_heads_maximum_on_448_and_stays_close_to_bf16(calibration, held_out):
    # fp8 caches are a GPU format; the builder's quality check runs them here through the CPU kernel
    reference, model, int8 = demo_model(), demo_model(), demo_model()
    absmax = kv_absmax(model, calibration)
    quantize_kv_cache(model, absmax, torch.float8_e4m3fn)
    quantize_kv_cache(int8, absmax)
    assert model.kv_cache_dtype() == torch.float8_e4m3fn
    layer0_k = cached_codes(model, calibration)[0]
    assert layer0_k.dtype == torch.float8_e4m3fn
    assert layer0_k.float().abs().amax(dim=(0, 2, 3)).tolist() == [448.0] * model.cfg.num_kv_heads
    q, q8 = compare(reference, model, held_out), compare(reference, int8, held_out)
    assert 0 < q.mean_kl < 0.02 and q.top1_agreement > 0.9
    assert q.mean_kl > q8.mean_kl  # 3 mantissa bits against int8's 7 bits at full range: fp8 loses more


def test_int8_kv_engine_builds_plans_half_the_cache_and_generates_like_bf16(make_engine, tmp_path):
    bf16 = make_engine("demo-bf16", DEMO, model={"dtype": "bfloat16"})
    engine = make_engine("demo-kv-int8", DEMO, **SECTIONS)
    manifest = Manifest.load(engine)
    assert manifest.kv_cache_dtype == "int8"
    with safe_open(engine / "rank0" / "weights.safetensors", "pt") as f:
        scales = f.get_tensor("layers.0.attn.kv_scales")
        assert scales.dtype == torch.float32 and scales.shape == (2, manifest.model.num_kv_heads)
        assert f.get_tensor("layers.0.attn.qkv.weight").dtype == torch.bfloat16  # weights untouched
    report = json.loads((engine / "report.json").read_text())
    assert 0 < report["quality"]["mean_kl"] < 0.01 and report["quality"]["top1_agreement"] > 0.95
    assert report["calibration"]["num_samples"] == SMALL_CALIBRATION.num_samples
    plain = json.loads((bf16 / "report.json").read_text())["memory_plan"]
    assert report["memory_plan"]["kv_bytes_per_token"] * 2 == plain["kv_bytes_per_token"]
    with LLMEngine.from_dir(engine) as llm:
        assert all(c.dtype == torch.int8 for c in llm.runner.kv_caches)
        # the same KV budget holds twice the blocks
        assert llm.memory.num_blocks == 2 * LLMEngine.from_dir(bf16).memory.num_blocks
    assert first_token_agreement(bf16, engine) >= 0.9
    recipe = write_recipe(tmp_path / "r.yaml", DEMO, **SECTIONS)
    plan = make_plan(load_recipe(recipe))
    with safe_open(engine / "rank0" / "weights.safetensors", "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if not k.startswith("rope_"))
    assert plan.memory.weight_bytes == stored


def test_chunked_prefill_and_decode_read_the_same_int8_cache_as_one_step(make_engine, calibration):
    engine = Engine.load(make_engine("demo-kv-int8", DEMO, **SECTIONS))
    model = demo_model()
    quantize_kv_cache(model, kv_absmax(model, calibration))
    ids = calibration[0, :200]
    whole = sequence_logits(model, ids)  # one step: every token attends to the dequantized cache
    # the engine's graph: 100 tokens prefilled in 2 chunks of at most 64, then 100 decode steps
    (chunked,) = window_logits(engine_graph(engine), [ids])
    assert (whole.argmax(-1) == chunked.argmax(-1)).float().mean() > 0.98
    # other GEMM blockings (a 36-row chunk, 1-row decode GEMVs) and decode attention summing the
    # dequantized cache in fp32 (no bf16 rounding) move single logits by a few bf16 steps; a wrong
    # cache read would move them all
    err = (chunked - whole).abs()
    assert err.max() < 0.25
    for rows in (slice(0, 100), slice(100, None)):  # prefill chunks, decode steps
        assert err[rows].mean() / whole.std() < 0.01


def test_compiled_int8_kv_engine_decodes_as_the_eager_one(make_engine):
    # teacher-forced: greedy generations of the small demo model part at exact bf16 ties
    eager = make_engine("demo-kv-int8", DEMO, **SECTIONS)
    compiled = make_engine("demo-kv-int8-compiled", DEMO, **SECTIONS, target={"backend": "compiled"})
    assert Manifest.load(compiled).target.backend == "compiled"
    prompt, forced = random_prompt(40, seed=1, vocab=4096), random_prompt(24, seed=2, vocab=4096)
    with LLMEngine.from_dir(eager) as llm:
        expected = teacher_forced_logits(llm, prompt, forced)
    with LLMEngine.from_dir(compiled) as llm:
        logits = teacher_forced_logits(llm, prompt, forced)
    decode = slice(len(prompt), None)  # the decode kernel's rows over the int8 cache
    assert (logits[decode].argmax(-1) == expected[decode].argmax(-1)).float().mean() >= 0.9
    assert (logits - expected).abs().mean() / expected.std() < 0.02

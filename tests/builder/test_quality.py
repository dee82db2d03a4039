"""The quality evaluation: windows run as the runtime runs them (prefill, then batched decode steps), the
gate's thresholds, and `llmbuild verify --quality` re-running the build's check on a built engine (its own
graph and weights against the checkpoint)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmbuild.builder.quality import Quality, engine_quality, gate_failures, model_graph, window_logits
from llmbuild.recipe import QualitySection
from tests.builder.quantization_fixtures import DEMO, W8A8_DEMO, sequence_logits
from tests.helpers import run_cli, tiny_model


@pytest.fixture(scope="module")
def int8_engine(make_engine):
    return make_engine("demo-int8", DEMO, model={"dtype": "bfloat16"}, quantization={"weights": "int8"})


@pytest.fixture(
    scope="module",
    params=[("int8", "eager"), ("int8", "compiled"), ("int4", "compiled"), ("w8a8", "compiled")],
    ids="-".join,
)
def quantized_engine(request, make_engine, int8_engine):
    weights, backend = request.param
    if backend == "eager":
        return int8_engine
    if weights == "w8a8":
        return make_engine("demo-w8a8-compiled", DEMO, **W8A8_DEMO)
    quantization = {"weights": weights, "group_size": 64}  # the demo MLP's 704 columns: groups of 64
    return make_engine(
        f"demo-{weights}-compiled",
        DEMO,
        model={"dtype": "bfloat16"},
        quantization=quantization,
        target={"backend": backend},
    )


def test_windows_give_the_same_logits_however_the_graph_limits_split_them():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, model.cfg.vocab_size, (12,), generator=g) for _ in range(5)]
    whole = [sequence_logits(model, w, block_size=4) for w in windows]  # one prefill step each
    graph = model_graph(model, block_size=4)
    # no limits: one prefill chunk per window, then 6 decode steps of all 5 windows
    # limits: windows in groups of 3 and 2, prompts prefilled in chunks of 5 and 1 token
    for limited in (graph, dataclasses.replace(graph, max_seqs=3, max_tokens=5, table_width=8)):
        for got, expected in zip(window_logits(limited, windows), whole, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="windows of one length"):
        window_logits(graph, [windows[0], windows[1][:7]])


def test_gate_failures_name_each_missed_threshold():
    q = Quality(reference_perplexity=10.0, perplexity=12.0, mean_kl=0.2, top1_agreement=0.5, tokens=100)
    failures = gate_failures(QualitySection(max_kl=0.1, min_top1=0.8), q)
    assert failures == ["mean KL 0.2 > quality.max_kl 0.1", "top-1 agreement 0.5000 < quality.min_top1 0.8"]
    assert gate_failures(QualitySection(max_kl=0.3, min_top1=0.4), q) == []
    assert gate_failures(QualitySection(), q) == []


def test_engine_quality_reproduces_the_build_time_check(quantized_engine):
    # the build checked the quantized model eagerly; verify runs the engine's own graph (a compiled package:
    # Inductor's fused kernels, another summation order) on the same windows
    built = json.loads((quantized_engine / "report.json").read_text())["quality"]
    again = engine_quality(quantized_engine)
    assert again.tokens == built["tokens"]
    assert again.reference_perplexity == pytest.approx(built["reference_perplexity"], rel=1e-4)
    assert again.perplexity == pytest.approx(built["perplexity"], rel=2e-3)
    assert again.mean_kl == pytest.approx(built["mean_kl"], rel=0.05)
    assert again.top1_agreement == pytest.approx(built["top1_agreement"], abs=0.01)


def test_verify_quality_prints_metrics_and_passes_the_recipes_gate(capsys, int8_engine):
    code, out, err = run_cli(capsys, "verify", str(int8_engine), "--no-smoke", "--quality")
    assert code == 0, err
    assert "mean KL" in out and "(at build:" in out and "within the recipe's thresholds" in out


def test_verify_quality_refuses_another_checkpoint_and_unquantized_engines(capsys, int8_engine, make_ckpt, make_engine):
    other = make_ckpt("llama")
    code, out, err = run_cli(capsys, "verify", str(int8_engine), "--no-smoke", "--quality", "--checkpoint", str(other))
    assert code != 0 and "is not the one" in err and "sha256 differs" in err
    code, out, err = run_cli(
        capsys, "verify", str(int8_engine), "--no-smoke", "--quality", "--checkpoint", "/nonexistent"
    )
    assert code != 0 and "checkpoint /nonexistent not found" in err
    code, out, err = run_cli(capsys, "verify", str(make_engine("llama", other)), "--no-smoke", "--quality")
    assert code != 0 and "not a quantized engine" in err

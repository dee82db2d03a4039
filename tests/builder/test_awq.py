"""AWQ: the scale search, and whole-model AWQ beating round-to-nearest where it should."""

from __future__ import annotations

import torch

from llmbuild.builder.awq import search_clip, search_scale
from llmbuild.builder.quality import compare
from llmbuild.builder.quant_format import Int4Grid, Int4Linear
from llmbuild.builder.quantize import quantize_model
from llmbuild.recipe import QuantizationSection
from tests.builder.quantization_fixtures import (
    SMALL_CALIBRATION,
    demo_model,
    small_calibration,
    with_outlier_channels,
)

RTN = QuantizationSection(weights="int4", group_size=64)
AWQ = QuantizationSection(weights="int4", group_size=64, method="awq", calibration=SMALL_CALIBRATION)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (x @ w.T - x @ wq.T).pow(2).mean().item()


def test_scale_search_protects_an_outlier_channel_and_never_loses_to_rtn():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    x[:, 7] *= 30  # one channel carries large activations
    w = torch.randn(64, 128, generator=gen)
    grid = Int4Grid(64, torch.bfloat16)
    s = search_scale(x, x.abs().mean(0), w, grid)
    assert s[7] > 3 * s.median()
    awq = output_error(x, w, grid.fake(w * s) / s)
    rtn = output_error(x, w, grid.fake(w))
    assert awq < 0.7 * rtn


def test_clip_search_shrinks_ranges_only_where_it_lowers_the_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=gen)
    w = torch.randn(32, 128, generator=gen)
    w[0, 3] = 12.0  # a lone large weight stretches its group's range
    grid = Int4Grid(64, torch.bfloat16)
    clip = search_clip(x, w, grid)
    assert clip.shape == (32, 2, 1) and ((clip <= 1) & (clip >= 0.5)).all()
    assert output_error(x, w, grid.fake(w, clip)) <= output_error(x, w, grid.fake(w))


def test_awq_beats_rtn_on_a_checkpoint_with_outlier_channels(held_out):
    reference = demo_model()
    rtn, awq = with_outlier_channels(demo_model()), with_outlier_channels(demo_model())
    quantize_model(rtn, RTN)
    names = quantize_model(awq, AWQ, small_calibration())
    assert len(names) == 16 and all(isinstance(awq.get_submodule(n), Int4Linear) for n in names)
    q_rtn, q_awq = compare(reference, rtn, held_out), compare(reference, awq, held_out)
    assert q_awq.mean_kl < 0.5 * q_rtn.mean_kl
    assert q_awq.top1_agreement > q_rtn.top1_agreement


def test_awq_beats_rtn_on_the_trained_demo_model_and_is_deterministic(held_out):
    reference, rtn, awq, again = demo_model(), demo_model(), demo_model(), demo_model()
    quantize_model(rtn, RTN)
    calibration = small_calibration()
    quantize_model(awq, AWQ, calibration)
    quantize_model(again, AWQ, calibration)
    assert compare(reference, awq, held_out).mean_kl < compare(reference, rtn, held_out).mean_kl
    for (name, a), (_, b) in zip(awq.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_awq_with_int8_keeps_the_function(held_out):
    # int8 is nearly lossless: whatever AWQ folds into norms and v / up rows must preserve the model
    reference, model = with_outlier_channels(demo_model()), with_outlier_channels(demo_model())
    quantize_model(
        model, QuantizationSection(weights="int8", method="awq", calibration=SMALL_CALIBRATION), small_calibration()
    )
    q = compare(reference, model, held_out)
    assert q.mean_kl < 0.005 and q.top1_agreement > 0.95

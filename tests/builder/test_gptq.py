"""GPTQ: the column-by-column algorithm, and whole-model GPTQ beating round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from llmbuild.builder.gptq import gptq
from llmbuild.builder.quality import compare
from llmbuild.builder.quant_format import Grid, Int4Grid, Int4Linear, Int8Grid
from llmbuild.builder.quantize import quantize_model
from llmbuild.recipe import QuantizationSection
from tests.builder.quantization_fixtures import (
    SMALL_CALIBRATION,
    demo_model,
    small_calibration,
    with_outlier_channels,
)

RTN = QuantizationSection(weights="int4", group_size=64)
GPTQ = QuantizationSection(weights="int4", group_size=64, method="gptq", calibration=SMALL_CALIBRATION)


def dequantize(q: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n, scales.shape[1], -1) * scales[..., None] + lows[..., None]).reshape(n, k)


@pytest.mark.parametrize(
    "grid", [Int4Grid(32, torch.bfloat16), Int4Grid(128, torch.bfloat16), Int8Grid(256, torch.bfloat16)]
)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(grid: Grid):
    # H = identity: no column's error can be compensated by another, so GPTQ must round as RTN does
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q, scales, lows = gptq(w, torch.eye(256), grid)
    torch.testing.assert_close(dequantize(q, scales, lows), grid.fake(w), rtol=0, atol=0)


@pytest.mark.parametrize("grid", [Int4Grid(64, torch.bfloat16), Int8Grid(256, torch.bfloat16)])
def test_gptq_compensates_rounding_errors_on_correlated_inputs(grid: Grid):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=gen) @ torch.randn(16, 256, generator=gen) + 0.1 * torch.randn(
        2048, 256, generator=gen
    )
    w = torch.randn(64, 256, generator=gen)
    q, scales, lows = gptq(w, x.T @ x, grid)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax and torch.equal(q, q.round())
    err_gptq = (x @ (w - dequantize(q, scales, lows)).T).pow(2).mean()
    err_rtn = (x @ (w - grid.fake(w)).T).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn


def test_dead_inputs_get_zero_weights():
    w = torch.randn(8, 64)
    h = torch.eye(64)
    h[5, 5] = 0  # an input that is always zero
    q, scales, lows = gptq(w, h, Int4Grid(64, torch.bfloat16))
    assert dequantize(q, scales, lows)[:, 5].abs().max() <= scales.max() / 2


def test_gptq_beats_rtn_on_the_trained_demo_model_and_with_outlier_channels(held_out):
    calibration = small_calibration()
    for prepare in (lambda m: m, with_outlier_channels):
        reference, rtn, model = prepare(demo_model()), prepare(demo_model()), prepare(demo_model())
        quantize_model(rtn, RTN)
        names = quantize_model(model, GPTQ, calibration)
        assert all(isinstance(model.get_submodule(n), Int4Linear) for n in names)
        q_rtn, q_gptq = compare(reference, rtn, held_out), compare(reference, model, held_out)
        assert q_gptq.mean_kl < 0.8 * q_rtn.mean_kl

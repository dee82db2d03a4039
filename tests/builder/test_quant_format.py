"""The int8 / int4 grids: which one a layer gets, and that a module stores what the grid rounds to."""

from __future__ import annotations

import torch

from llmbuild.builder.quant_format import Int4Grid, Int4Linear, Int8Grid, ScaledLinear, grid_of
from llmbuild.recipe import QuantizationSection


def test_int8_groups_whole_rows_in_the_model_dtype_and_int4_groups_columns_in_bf16():
    assert grid_of(QuantizationSection(weights="int8"), 96, torch.float16) == Int8Grid(96, torch.float16)
    int4 = QuantizationSection(weights="int4", group_size=32)
    assert grid_of(int4, 96, torch.float16) == Int4Grid(32, torch.bfloat16)


def test_an_int8_module_holds_the_codes_and_scales_of_the_grid():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    grid = Int8Grid(128, torch.bfloat16)
    module = grid.module(w, None)
    assert isinstance(module, ScaledLinear) and module.scales.dtype == torch.bfloat16
    assert module.weight.min() >= grid.qmin and module.weight.max() <= grid.qmax
    dequantized = module.weight.float() * module.scales.float()[:, None]
    torch.testing.assert_close(dequantized, grid.fake(w), rtol=0, atol=0)


def test_int4_codes_span_zero_to_fifteen_with_a_scale_and_min_per_group():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    grid = Int4Grid(64, torch.bfloat16)
    groups = w.reshape(16, 2, 64)
    scale, low = grid.fit(groups)
    q = grid.round(groups, scale, low)
    assert q.min() == grid.qmin and q.max() == grid.qmax and torch.equal(q, q.round())
    module = grid.module(w, None)
    assert isinstance(module, Int4Linear) and module.scales.shape == module.mins.shape == (16, 2)

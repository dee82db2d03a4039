from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.rms_norm import add_rms_norm_ref, rms_norm_ref


def inputs(dtype, rows=7, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=g) * 3).to(dtype)
    r = torch.randn(rows, d, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    return x, r, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_reference(dtype):
    x, _, w = inputs(dtype)
    out = torch.ops.llmbuild.rms_norm(x, w, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), atol=1e-6, rtol=1e-5)
    else:  # same rounding points as the reference: identical bits
        assert torch.equal(out, rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference(dtype):
    x, r, w = inputs(dtype, rows=5, d=2048)
    out, total = torch.ops.llmbuild.add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_total = add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(total, ref_total)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    else:
        assert torch.equal(out, ref_out)


def test_non_contiguous_rows_and_3d_inputs():
    x, _, w = inputs(torch.float32, rows=8)
    view = x.view(2, 4, 96)[:, ::2]
    torch.testing.assert_close(torch.ops.llmbuild.rms_norm(view, w, 1e-6), rms_norm_ref(view, w, 1e-6))


def test_bad_weight_fails_with_a_message():
    x, _, w = inputs(torch.float32)
    with pytest.raises(RuntimeError, match="does not fit rows"):
        torch.ops.llmbuild.rms_norm(x, w[:-1], 1e-6)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.llmbuild.add_rms_norm(x, x[:-1], w, 1e-6)


def test_opcheck():
    x, r, w = inputs(torch.float32)
    torch.library.opcheck(torch.ops.llmbuild.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.llmbuild.add_rms_norm.default, (x, r, w, 1e-6))

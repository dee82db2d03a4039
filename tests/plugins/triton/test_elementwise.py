"""Triton elementwise kernels (plugins/triton/elementwise.py) against the ops' torch references,
under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.rms_norm import add_rms_norm_ref, rms_norm_ref
from llmbuild.plugins.rope import rope_ref
from llmbuild.plugins.swiglu import swiglu_ref
from llmbuild.plugins.triton import elementwise as triton_elementwise
from tests.helpers import DEVICE

DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 100])  # 100: a row narrower than its power-of-two block
def test_rms_norm_and_the_fused_residual_add(dtype, n):
    x, res, w = rand(5, n, dtype=dtype), rand(5, n, dtype=dtype, seed=1), rand(n, dtype=dtype, seed=2)
    torch.testing.assert_close(triton_elementwise.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    out, total = triton_elementwise.add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_total = add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 1100])  # 1100: two column blocks, the second partial
def test_swiglu(dtype, n):
    gate_up = rand(3, 2 * n, dtype=dtype)
    torch.testing.assert_close(triton_elementwise.swiglu(gate_up), swiglu_ref(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_at_scattered_positions(dtype):
    t, heads, d, max_len = 6, 3, 16, 40
    x = rand(t, heads, d, dtype=dtype)
    angles = torch.outer(torch.arange(max_len).float(), torch.rand(d // 2, generator=torch.Generator().manual_seed(3)))
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    positions = torch.tensor([0, 7, 39, 3, 3, 21], device=DEVICE)
    torch.testing.assert_close(triton_elementwise.rope(x, positions, cos, sin), rope_ref(x, positions, cos, sin))


def test_rope_needs_a_power_of_two_head_dim():
    x = rand(2, 1, 24, dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        triton_elementwise.rope(x, torch.zeros(2, dtype=torch.int64), torch.ones(4, 24), torch.zeros(4, 24))

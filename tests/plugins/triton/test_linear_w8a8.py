"""The Triton linear_w8a8 (plugins/triton/linear_w8a8.py) against the op's torch reference, under the
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.linear_int8 import quantize_int8
from llmbuild.plugins.linear_w8a8 import linear_w8a8_ref
from llmbuild.plugins.triton import ops  # noqa: F401  (registers torch.ops.llmbuild_triton)
from tests.helpers import DEVICE


@pytest.mark.parametrize("m", [3, 21])  # 21 rows: a second, partial tile of 16
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last K tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_reference(m, k, dtype, bias):
    g = torch.Generator().manual_seed(k + m)
    n = 80  # a second, partial tile of 64 output features
    w, scales = quantize_int8(torch.randn(n, k, generator=g), dtype)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[1] = 0  # amax 0: codes 0, the row's output is the bias
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    expected = linear_w8a8_ref(x, w, scales, b)
    on = [t.to(DEVICE) if t is not None else None for t in (x, w, scales, b)]
    out = torch.ops.llmbuild_triton.linear_w8a8(*on).cpu()
    assert out.shape == expected.shape and out.dtype == dtype
    if DEVICE == "cpu":
        # the interpreter computes in numpy without fusing: the reference's exact arithmetic
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    else:
        # a GPU may fuse the bias add into an fma: one fp32 rounding, then the output's
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=2**-7)


def test_batched_input_shape():
    w, scales = quantize_int8(torch.randn(40, 64), torch.bfloat16)
    x = torch.randn(2, 3, 64).bfloat16()
    out = torch.ops.llmbuild_triton.linear_w8a8(x.to(DEVICE), w.to(DEVICE), scales.to(DEVICE), None)
    assert out.shape == (2, 3, 40)
    torch.testing.assert_close(out.cpu(), linear_w8a8_ref(x, w, scales, None), atol=0, rtol=0)

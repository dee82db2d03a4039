from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.swiglu import swiglu_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 704), (2, 3, 2 * 64)])
def test_matches_reference(dtype, shape):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    out = torch.ops.llmbuild.swiglu(x)
    ref = swiglu_ref(x)
    assert out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    else:  # silu is rounded before the multiply, as aten does; exp may differ in the last fp32 bit
        torch.testing.assert_close(out, ref, atol=0, rtol=2**-7)


def test_odd_width_fails():
    with pytest.raises(RuntimeError, match="is not even"):
        torch.ops.llmbuild.swiglu(torch.randn(2, 7))


def test_opcheck():
    torch.library.opcheck(torch.ops.llmbuild.swiglu.default, (torch.randn(3, 16),))

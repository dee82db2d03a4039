from __future__ import annotations

import pytest
import torch

from llmbuild.builder.models.llama import rope_tables
from llmbuild.model_config import RopeConfig
from llmbuild.plugins.rope import rope_ref


def case(dtype, t=9, h=4, d=32, seed=0, scaling="none"):
    g = torch.Generator().manual_seed(seed)
    rope = (
        RopeConfig(theta=10000.0)
        if scaling == "none"
        else RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=64)
    )
    cos, sin = rope_tables(rope, d, 256)
    qkv = torch.randn(t, 3 * h * d, generator=g).to(dtype)
    x = qkv[:, : h * d].view(t, h, d)  # a view into a fused projection, as in the model graph
    positions = torch.randint(0, 256, (t,), generator=g)
    return x, positions, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", ["none", "llama3"])
def test_matches_reference(dtype, scaling):
    x, positions, cos, sin = case(dtype, scaling=scaling)
    out = torch.ops.llmbuild.rope(x, positions, cos, sin)
    ref = rope_ref(x, positions, cos, sin)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(out, ref)


def test_out_of_table_position_fails():
    x, positions, cos, sin = case(torch.float32)
    positions[0] = 256
    with pytest.raises(RuntimeError, match="position 256 outside the table"):
        torch.ops.llmbuild.rope(x, positions, cos, sin)


def test_opcheck():
    x, positions, cos, sin = case(torch.float32)
    torch.library.opcheck(torch.ops.llmbuild.rope.default, (x, positions, cos, sin))

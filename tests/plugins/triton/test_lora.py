"""The Triton lora (plugins/triton/lora.py) against the op's torch reference, under the interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.lora import lora_ref
from llmbuild.plugins.triton import ops  # noqa: F401  (registers torch.ops.llmbuild_triton)
from tests.helpers import DEVICE

S, R, IN = 4, 8, 40  # IN: a partial last K block

# per slot (rows) and slice (columns): full rank, lower ranks, rank 0; slot 0's ranks are garbage
RANKS = {1: [[3], [R], [0], [5]], 2: [[4, 1], [R, 2], [0, 5], [1, 0]], 3: [[2, 2, 2], [R, 4, 1], [0, 0, 3], [6, R, 0]]}
SLICES = {1: (24,), 2: (16, 12), 3: (20, 6, 6)}


def case(dtype, slots, n, seed=0):
    """Slot buffers whose unused elements (slot 0, rows beyond a slice's rank) are garbage, not zeros."""
    g = torch.Generator().manual_seed(seed)
    out = sum(SLICES[n])
    x = torch.randn(len(slots), IN, generator=g).to(dtype)
    y = (torch.randn(len(slots), out, generator=g) * 4).to(dtype)
    y[:, ::3] = -0.0  # a zero added to -0.0 would make it +0.0
    a = (torch.randn(S, n * R, IN, generator=g) * 0.3).to(dtype)
    b = (torch.randn(S, R, out, generator=g) * 0.3).to(dtype)
    return x, y, a, b, torch.tensor(RANKS[n], dtype=torch.int32), torch.tensor(slots, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_the_reference(dtype, n):
    slots = [0, 1, 2, 1, 3, 0, 3]
    args = case(dtype, slots, n)
    expected = lora_ref(*args, SLICES[n])
    out = torch.ops.llmbuild_triton.lora(*[t.to(DEVICE) for t in args], list(SLICES[n])).cpu()
    assert out.shape == expected.shape and out.dtype == dtype
    # the fp32 sums run in another order: a rounding to 16 bits may land one ulp apart
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=rtol)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    out_bits, y_bits = out.view(bits), args[1].view(bits)
    offsets = torch.tensor((0, *SLICES[n])).cumsum(0).tolist()
    for t, s in enumerate(slots):  # slot-0 tokens and rank-0 slices: y's bits
        for j in range(n):
            cols = slice(offsets[j], offsets[j + 1])
            if s == 0 or RANKS[n][s][j] == 0:
                assert torch.equal(out_bits[t, cols], y_bits[t, cols])


def test_a_step_without_adapters_returns_a_copy_of_y():
    x, y, a, b, ranks, slots = (t.to(DEVICE) for t in case(torch.bfloat16, [0, 0, 0], 2))
    out = torch.ops.llmbuild_triton.lora(x, y, a, b, ranks, slots, list(SLICES[2]))
    assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()


def test_more_than_three_slices_are_refused():
    x, y, a, b, ranks, slots = case(torch.float32, [1], 2)
    with pytest.raises(ValueError, match="1 to 3 slices"):
        torch.ops.llmbuild_triton.lora(x, y, a[:, :8], b, ranks.repeat(1, 2), slots, [7, 7, 7, 7])

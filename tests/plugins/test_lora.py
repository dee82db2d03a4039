from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from llmbuild.plugins.lora import lora_ref

S, R, IN = 5, 8, 48  # slots (slot 0 = no adapter), max_rank, input features


def case(dtype, slots, slices, ranks, seed=0, k=IN):
    """Slot buffers whose every unused element is garbage (slot 0, rows beyond a slice's rank): a kernel
    that reads any of them is wrong. ranks: [S][n] per slot and slice."""
    g = torch.Generator().manual_seed(seed)
    n, out = len(slices), sum(slices)
    x = torch.randn(len(slots), k, generator=g).to(dtype)
    y = (torch.randn(len(slots), out, generator=g) * 4).to(dtype)
    a = (torch.randn(S, n * R, k, generator=g) * 0.3).to(dtype)
    b = (torch.randn(S, R, out, generator=g) * 0.3).to(dtype)
    return x, y, a, b, torch.tensor(ranks, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32)


def lora(*args, slices):
    return torch.ops.llmbuild.lora(*args, list(slices))


# per slot (rows) and slice (columns): full rank, lower ranks, rank-0 slices; slot 0's ranks are garbage too
RANKS = {
    1: [[3], [R], [2], [0], [5]],
    2: [[4, 1], [R, R], [3, 0], [0, 5], [1, 1]],
    3: [[2, 2, 2], [R, 4, 1], [0, 0, 3], [6, R, 0], [0, 0, 0]],
}
SLICES = {1: (40,), 2: (24, 24), 3: (32, 8, 8)}


def assert_close_to_reference(out, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:  # the fp32 sums differ in order: a rounding to 16 bits may land one ulp apart
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=2**-7)


def mixed_slots(t, seed=1):
    """Every slot, slot 0 included, in a shuffled order with repeats; a step of one token gets slot 1."""
    if t == 1:
        return [1]
    return torch.randint(0, S, (t,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("t", [1, 400])
def test_matches_the_reference(dtype, n, t):
    slots = mixed_slots(t)
    assert t == 1 or sum(s != 0 for s in slots) > 256  # 400 tokens: the GEMM path
    x, y, a, b, ranks, slots_t = case(dtype, slots, SLICES[n], RANKS[n])
    out = lora(x, y, a, b, ranks, slots_t, slices=SLICES[n])
    expected = lora_ref(x, y, a, b, ranks, slots_t, SLICES[n])
    assert out.shape == y.shape and out.dtype == dtype
    assert_close_to_reference(out, expected, dtype)
    assert not torch.equal(out, y)  # every case adapts some element


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [2, 16, 64, 256])
def test_decode_steps_match_the_reference_at_every_tier(kernel_isa, dtype, t):
    """Up to 256 adapted tokens take the decode loops: groups of 1 to 4+ tokens, inputs past one 512-wide
    pass and not a multiple of 32, slices over one 128-column chunk and with ragged ends."""
    slices, k = (200, 72, 40), 600
    slots = mixed_slots(t, seed=t)
    x, y, a, b, ranks, slots_t = case(dtype, slots, slices, RANKS[3], seed=t, k=k)
    out = lora(x, y, a, b, ranks, slots_t, slices=slices)
    assert_close_to_reference(out, lora_ref(x, y, a, b, ranks, slots_t, slices), dtype)
    assert not torch.equal(out, y)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("t", [16, 400])  # the decode loops and the GEMMs (over 256 adapted tokens)
def test_slot_0_tokens_and_rank_0_slices_are_bit_exact_copies_of_y(kernel_isa, n, t):
    slots = mixed_slots(t)
    x, y, a, b, ranks, slots_t = case(torch.bfloat16, slots, SLICES[n], RANKS[n])
    y[::2] = -0.0  # a zero added to -0.0 would make it +0.0
    out = lora(x, y, a, b, ranks, slots_t, slices=SLICES[n])
    out_bits, y_bits = out.view(torch.int16), y.view(torch.int16)
    base = slots_t == 0
    assert base.any() and torch.equal(out_bits[base], y_bits[base])
    offsets = torch.tensor((0, *SLICES[n])).cumsum(0).tolist()
    for t, s in enumerate(slots):
        for j in range(n):
            cols = slice(offsets[j], offsets[j + 1])
            if s != 0 and RANKS[n][s][j] == 0:
                assert torch.equal(out_bits[t, cols], y_bits[t, cols])


def test_a_step_without_adapters_returns_a_copy_of_y():
    x, y, a, b, ranks, slots_t = case(torch.bfloat16, [0] * 16, SLICES[2], RANKS[2])
    out = lora(x, y, a, b, ranks, slots_t, slices=SLICES[2])
    assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()
    out.add_(1)
    assert not torch.equal(out, y)


def test_each_adapter_equals_its_merged_weights():
    """The reference against an independent formula: x @ (W + B_s A_s).T per token, slice by slice."""
    slices = SLICES[3]
    slots = mixed_slots(40, seed=2)
    x, _, a, b, ranks, slots_t = case(torch.float32, slots, slices, RANKS[3], seed=3)
    w = torch.randn(sum(slices), IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = (x.double() @ w.T).float()
    expected = torch.empty(len(slots), sum(slices), dtype=torch.float64)
    for t, s in enumerate(slots):
        merged = w.clone()
        off = 0
        for j, width in enumerate(slices):
            r = RANKS[3][s][j] if s != 0 else 0
            delta = b[s, :r, off : off + width].double().T @ a[s, j * R : j * R + r].double()
            merged[off : off + width] += delta
            off += width
        expected[t] = merged @ x[t].double()
    ref = lora_ref(x, y, a, b, ranks, slots_t, slices)
    torch.testing.assert_close(ref.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lora(x, y, a, b, ranks, slots_t, slices=slices).double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda args: args.update(slots=torch.tensor([0, S], dtype=torch.int32)), "has slot 5"),
        (lambda args: args.update(slots=torch.tensor([0, -1], dtype=torch.int32)), "has slot -1"),
        (lambda args: args["ranks"].__setitem__((2, 0), R + 1), "has rank 9"),
        (lambda args: args.update(y=args["y"].double()), "must share a dtype"),
        (lambda args: args.update(slices=[24, 23]), "slices sum to 47"),
        (lambda args: args.update(slots=args["slots"].long()), "slots must be int32"),
    ],
)
def test_bad_arguments_fail_with_a_message(change, message):
    x, y, a, b, ranks, slots_t = case(torch.float32, [0, 2], SLICES[2], RANKS[2])
    args = {"x": x, "y": y, "a": a, "b": b, "ranks": ranks, "slots": slots_t, "slices": list(SLICES[2])}
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.llmbuild.lora(**args)


def test_opcheck():
    x, y, a, b, ranks, slots_t = case(torch.float32, [0, 3, 1], SLICES[2], RANKS[2])
    torch.library.opcheck(torch.ops.llmbuild.lora.default, (x, y, a, b, ranks, slots_t, list(SLICES[2])))


class _Projection(torch.nn.Module):
    def __init__(self, w, a, b, ranks, slices):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)
        for name, buffer in {"a": a, "b": b, "ranks": ranks}.items():
            self.register_buffer(name, buffer)
        self.slices = list(slices)

    def forward(self, x, slots):
        return torch.ops.llmbuild.lora(x, x @ self.w.T, self.a, self.b, self.ranks, slots, self.slices)


def test_export_with_a_dynamic_token_count():
    slices = SLICES[3]
    x, _, a, b, ranks, slots_t = case(torch.float32, mixed_slots(6), slices, RANKS[3])
    w = torch.randn(sum(slices), IN, generator=torch.Generator().manual_seed(5))
    module = _Projection(w, a, b, ranks, slices)
    tokens = Dim("tokens", min=1, max=512)
    program = torch.export.export(module, (x, slots_t), dynamic_shapes=({0: tokens}, {0: tokens}))
    assert "llmbuild.lora.default" in {str(node.target) for node in program.graph.nodes}
    x2, _, _, _, _, slots2 = case(torch.float32, mixed_slots(300, seed=6), slices, RANKS[3], seed=7)
    torch.testing.assert_close(program.module()(x2, slots2), module(x2, slots2), atol=0, rtol=0)

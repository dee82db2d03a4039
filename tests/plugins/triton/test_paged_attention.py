"""Triton paged attention (plugins/triton/paged_attention.py) against the ops' torch references, under
the interpreter on CPU: packed steps mixing fresh prompts, decodes and continued chunks, partial
last blocks, scattered block tables, GQA groups of 1, 2 and 4 (6 kv heads of 24: a group padded to
a power of two is not), and the int8 and fp8 caches."""

from __future__ import annotations

import pytest
import torch

from llmbuild.plugins.paged_attention import paged_attention_ref, quantized_paged_attention_ref
from llmbuild.plugins.triton import ops  # noqa: F401  (registers torch.ops.llmbuild_triton)
from tests.helpers import DEVICE, D, make_case, quantized_case

STEPS = {
    "mixed": {},  # a 5-token prompt, a decode at 20, a 3-token chunk continuing 9 cached
    "decode-only": {"ctx_lens": (1, 7, 33, 4), "new_tokens": (1, 1, 1, 1)},
    # 130 new tokens: several query tiles; 150 keys: several 64-position key tiles
    "long-chunk": {"ctx_lens": (150, 9), "new_tokens": (130, 9), "num_blocks": 48},
}
HEADS = {"gqa2": (4, 2), "mha": (2, 2), "gqa4": (8, 2), "gqa3": (6, 2)}


def on_device(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_attention_matches_the_reference(step, heads, dtype, tol):
    args, *_ = make_case(dtype, heads=HEADS[heads], **STEPS[step])
    ref_args = [a.clone() for a in args]
    expected = paged_attention_ref(*ref_args, D**-0.5)
    args = on_device(args)
    out = torch.ops.llmbuild_triton.paged_attention(*args, D**-0.5)
    torch.testing.assert_close(out.cpu(), expected, atol=tol, rtol=tol)
    assert torch.equal(args[3].cpu(), ref_args[3]) and torch.equal(args[4].cpu(), ref_args[4])  # K/V written


@pytest.mark.parametrize("codes", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_quantized_paged_attention_matches_the_reference(step, dtype, tol, codes):
    args, kv_scales, *_ = quantized_case(dtype, codes, **STEPS[step])
    ref_args = [a.clone() for a in args]
    expected = quantized_paged_attention_ref(*ref_args, kv_scales, D**-0.5)
    args = on_device(args)
    out = torch.ops.llmbuild_triton.quantized_paged_attention(*args, kv_scales.to(DEVICE), D**-0.5)
    # the same codes: division rounded to nearest, then half to even, as torch does (compared as values:
    # an fp8 zero may come out with the other sign)
    assert torch.equal(args[3].cpu().float(), ref_args[3].float())
    assert torch.equal(args[4].cpu().float(), ref_args[4].float())
    torch.testing.assert_close(out.cpu(), expected, atol=tol, rtol=tol)

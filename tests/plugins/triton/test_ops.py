"""The Triton ops (plugins/triton/ops.py): the CPU ops' schemas, the kernels behind them, and one
graph node each under torch.export (what AOTInductor lowers to the kernels on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmbuild.plugins import OP_VERSIONS, load_plugins
from llmbuild.plugins.linear_fp8 import linear_fp8_ref, quantize_fp8
from llmbuild.plugins.linear_int4 import linear_int4_ref, pack_int4, quantize_int4
from llmbuild.plugins.linear_int8 import linear_int8_ref, quantize_int8
from llmbuild.plugins.paged_attention import quantized_paged_attention_ref
from llmbuild.plugins.triton import ops  # noqa: F401  (registers torch.ops.llmbuild_triton)
from tests.helpers import DEVICE, D, quantized_case

# every CPU op has a Triton twin, except the projection (aten's linear on a GPU: builder/retarget.py)
OPS = sorted(name.split("::")[1] for name in OP_VERSIONS if name != "llmbuild::linear")


def signature(op: torch._ops.OpOverloadPacket) -> tuple:
    """Argument names, types and which are written; return types (alias set names aside)."""
    schema = op.default._schema
    args = [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    return args, [str(r.type) for r in schema.returns]


@pytest.mark.parametrize("name", OPS)
def test_each_triton_op_has_the_schema_of_its_cpu_op(name):
    load_plugins()
    assert signature(getattr(torch.ops.llmbuild_triton, name)) == signature(getattr(torch.ops.llmbuild, name))


def test_the_op_runs_the_kernels_and_mutates_the_caches_it_declares():
    args, kv_scales, *_ = quantized_case(torch.bfloat16, ctx_lens=(30, 9), new_tokens=(1, 9))
    ref_args = [a.clone() for a in args]
    expected = quantized_paged_attention_ref(*ref_args, kv_scales, D**-0.5)
    args = [a.to(DEVICE) for a in args]
    out = torch.ops.llmbuild_triton.quantized_paged_attention(*args, kv_scales.to(DEVICE), D**-0.5)
    torch.testing.assert_close(out.cpu(), expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(args[3].cpu(), ref_args[3]) and torch.equal(args[4].cpu(), ref_args[4])


EXPORT = textwrap.dedent(
    """
    import torch
    from torch.export import Dim
    import llmbuild.plugins.triton.ops  # registers torch.ops.llmbuild_triton

    class Step(torch.nn.Module):
        def forward(self, x, w, k, v, k_cache, v_cache, slots, tables, lens, cu):
            h = torch.ops.llmbuild_triton.rms_norm(x, w, 1e-6).view(-1, 2, 16)
            return torch.ops.llmbuild_triton.paged_attention(h, k, v, k_cache, v_cache, slots, tables, lens, cu, 0.25)

    t = Dim("tokens", min=2, max=64)
    args = (
        torch.randn(5, 32), torch.ones(32), torch.randn(5, 1, 16), torch.randn(5, 1, 16),
        torch.zeros(4, 1, 4, 16), torch.zeros(4, 1, 4, 16), torch.arange(5),
        torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
        torch.tensor([0, 5], dtype=torch.int32),
    )
    dims = ({0: t}, None, {0: t}, {0: t}, None, None, {0: t}, None, None, None)
    ep = torch.export.export(Step(), args, dynamic_shapes=dims)
    print(sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"}))
    """
)


def test_export_keeps_each_triton_op_as_one_node():
    # without the interpreter: export traces the ops (fake tensors), nothing runs, no GPU needed
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", EXPORT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    targets = result.stdout.strip().splitlines()[-1]
    assert "llmbuild_triton.rms_norm.default" in targets and "llmbuild_triton.paged_attention.default" in targets
    assert "triton_kernel_wrapper" not in targets  # lowered by AOTInductor, not by export


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_int4_matches_the_reference(group, dtype, tol, bias):
    g = torch.Generator().manual_seed(group)
    n, k = 80, 256  # 80 rows: a second, partial tile of 64 output features
    q, scales, mins = quantize_int4(torch.randn(n, k, generator=g), group)
    w = pack_int4(q)
    x = torch.randn(3, 7, k, generator=g).to(dtype)  # 21 rows: a partial tile of 16
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    expected = linear_int4_ref(x, w, scales, mins, b)
    on = [t.to(DEVICE) if t is not None else None for t in (x, w, scales, mins, b)]
    out = torch.ops.llmbuild_triton.linear_int4(*on)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last K tile
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_int8_matches_the_reference(k, dtype, tol, bias):
    g = torch.Generator().manual_seed(k)
    n = 80  # a second, partial tile of 64 output features
    w, scales = quantize_int8(torch.randn(n, k, generator=g), dtype)
    x = torch.randn(3, 7, k, generator=g).to(dtype)  # 21 rows: a partial tile of 16
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    expected = linear_int8_ref(x, w, scales, b)
    on = [t.to(DEVICE) if t is not None else None for t in (x, w, scales, b)]
    out = torch.ops.llmbuild_triton.linear_int8(*on)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
# fp32: Hopper's fp8 tensor cores accumulate with about 14 bits of mantissa, not fp32's 24 (DeepSeek-V3's
# report, 3.3.2); measured on an H200: 8e-5 of the largest output
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-4), (torch.bfloat16, 1e-2)])
def test_linear_fp8_matches_the_reference(granularity, dtype, tol):
    g = torch.Generator().manual_seed(3)
    w, scales = quantize_fp8(torch.randn(48, 64, generator=g) * torch.logspace(-2, 0, 48)[:, None], granularity)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    expected = linear_fp8_ref(x, w, scales, b)
    out = torch.ops.llmbuild_triton.linear_fp8(x.to(DEVICE), w.to(DEVICE), scales.to(DEVICE), b.to(DEVICE))
    assert out.shape == expected.shape and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)

"""The Triton kernels as torch ops for cuda engines: `torch.ops.llmbuild_triton.<op>`, each with the
schema of its `llmbuild::` op (plugins/csrc/library.cpp) and the same torch reference.

Defined with torch.library.triton_op, and every kernel launched through wrap_triton: torch.export
keeps each op as one node, and AOTInductor lowers it to its Triton kernels, compiled into the
package (no Python at run time; CUDA-graph capturable). The namespace is a second one because an op
whose schema C++ defines (TORCH_LIBRARY) cannot take a triton_op implementation.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from llmbuild.plugins.linear_fp8 import quantize_activations_fp8
from llmbuild.plugins.triton import elementwise
from llmbuild.plugins.triton import linear_int4 as int4
from llmbuild.plugins.triton import linear_int8 as int8
from llmbuild.plugins.triton import linear_w8a8 as w8a8
from llmbuild.plugins.triton import lora as lora_kernels
from llmbuild.plugins.triton import paged_attention as attention

NAMESPACE = "llmbuild_triton"
_CACHES = {"k_cache", "v_cache"}


@triton_op(f"{NAMESPACE}::paged_attention", mutates_args=_CACHES)
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return attention.attend(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, None, scale)


@triton_op(f"{NAMESPACE}::quantized_paged_attention", mutates_args=_CACHES)
def quantized_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_scales: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return attention.attend(
        q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, kv_scales, scale
    )


@triton_op(f"{NAMESPACE}::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return elementwise.rms_norm(x, weight, eps)


@triton_op(f"{NAMESPACE}::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return elementwise.add_rms_norm(x, residual, weight, eps)


@triton_op(f"{NAMESPACE}::rope", mutates_args=())
def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return elementwise.rope(x, positions, cos, sin)


@triton_op(f"{NAMESPACE}::swiglu", mutates_args=())
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return elementwise.swiglu(gate_up)


@triton_op(f"{NAMESPACE}::linear_int4", mutates_args=())
def linear_int4(
    x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return int4.linear_int4(x, w, scales, mins, bias)


@triton_op(f"{NAMESPACE}::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return int8.linear_int8(x, w, scales, bias)


@triton_op(f"{NAMESPACE}::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return w8a8.linear_w8a8(x, w, scales, bias)


@triton_op(f"{NAMESPACE}::lora", mutates_args=())
def lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    slots: torch.Tensor,
    slices: list[int],
) -> torch.Tensor:
    return lora_kernels.lora(x, y, a, b, ranks, slots, slices)


@triton_op(f"{NAMESPACE}::linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Hopper's fp8 tensor cores through cuBLASLt (torch._scaled_mm); Inductor fuses the activation
    # quantization around it. Per-row weight scales take cuBLAS's row-wise mode, which wants one
    # scale per row of x as well (the step's one scale, repeated) and a bf16 output.
    n, k = w.shape
    xq, x_scale = quantize_activations_fp8(x.reshape(-1, k))
    if scales.numel() == 1:
        y = torch._scaled_mm(xq, w.t(), x_scale.reshape(()), scales.reshape(()), out_dtype=x.dtype)
    else:
        out_dtype = torch.bfloat16 if x.dtype == torch.float16 else x.dtype
        row_scales = x_scale.expand(xq.shape[0], 1).contiguous()
        y = torch._scaled_mm(xq, w.t(), row_scales, scales.reshape(1, n), out_dtype=out_dtype)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


_cuda_library: torch.library.Library | None = None


def register_cuda_kernels(table: dict[torch._ops.OpOverload, torch._ops.OpOverload]) -> None:
    """Give each `llmbuild::` op of `table` (builder/retarget.cuda_ops) its twin as CUDA kernel, so that
    the model graph runs eagerly on a GPU: the builder's KV calibration and quality check of cuda
    engines. Compiled graphs call the twins directly (retargeted), never these registrations."""
    global _cuda_library
    if _cuda_library is not None:
        return
    _cuda_library = torch.library.Library("llmbuild", "IMPL")
    for op, twin in table.items():
        _cuda_library.impl(op._schema.name.split("::")[1], twin, "CUDA")

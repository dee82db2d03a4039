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

from llmbuild.plugins.triton import elementwise
from llmbuild.plugins.triton import linear_int4 as int4
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

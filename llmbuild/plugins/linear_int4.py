"""`llmbuild::linear_int4`: y = x @ dequant(w).T + bias for 4-bit weights in groups of 32, 64 or 128 columns.

Format (ISA-independent; csrc/linear_int4.cpp documents the byte layout): w uint8 [N, K/2], two
columns per byte, each 64-column block of a row stored as 32 bytes whose low nibbles hold columns
0..31 and high nibbles columns 32..63; scales and mins bf16 [N, K/group];
w_real = q * scale + min with q in 0..15 (asymmetric, round to nearest: `quantize_int4`).

The CPU kernel multiplies the weight bytes against int8-quantized activations (one scale per 32
columns; AVX-512 VNNI, AVX2 or portable, the same sums in each) for decode-sized batches, and dequantizes
to a dense GEMM for larger ones. The reference dequantizes and runs aten's linear;
`linear_int4_decode_ref` adds the activation quantization, so the kernel's arithmetic can be checked
exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmbuild.plugins.linear_int8 import quantize_activations_ref

OP_NAME = "llmbuild::linear_int4"
VERSION = 1
GROUP_SIZES = (32, 64, 128)


def int4_params(g: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) [..., 1] of groups g [..., group], rounded to bf16 (kept as fp32): the group's
    range widened to include 0, shrunk by `clip` (<= 1; AWQ's clipping search)."""
    lo = g.float().amin(dim=-1, keepdim=True).clamp(max=0) * clip
    hi = g.float().amax(dim=-1, keepdim=True).clamp(min=0) * clip
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    return scale.to(torch.bfloat16).float(), lo.to(torch.bfloat16).float()


def round_int4(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Codes (float, 0..15) of w on the grid (scale, min), both broadcast against w."""
    return torch.round((w.float() - low) / scale).clamp(0, 15)


def quantize_int4(
    w: torch.Tensor, group_size: int, scales: torch.Tensor | None = None, mins: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit round to nearest per group: (q uint8 [N, K] in 0..15, scales, mins bf16 [N, K/group]).

    Given scales and mins (e.g. from a search), only rounds w onto that grid.
    """
    n, k = w.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 needs K ({k}) to be a multiple of group_size ({group_size}), one of {GROUP_SIZES}")
    g = w.float().reshape(n, k // group_size, group_size)
    if scales is None or mins is None:
        scale, low = int4_params(g)
        scales, mins = scale[..., 0].to(torch.bfloat16), low[..., 0].to(torch.bfloat16)
    # round against the bf16 values the kernel will use, so the stored grid is the one quantized onto
    q = round_int4(g, scales.float()[..., None], mins.float()[..., None])
    return q.reshape(n, k).to(torch.uint8), scales, mins


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 -> the kernel's byte layout, uint8 [N, K/2]."""
    n, k = q.shape
    if k % 64:
        raise ValueError(f"int4 packing needs K ({k}) to be a multiple of 64")
    blocks = q.reshape(n, k // 64, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    n, half = w.shape
    blocks = w.reshape(n, half // 32, 1, 32)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def dequantize_int4(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] from the packed weight."""
    q = unpack_int4(w).float()
    n, k = q.shape
    group = k // scales.shape[1]
    g = q.reshape(n, -1, group) * scales.float()[..., None] + mins.float()[..., None]
    return g.reshape(n, k)


def linear_int4_ref(x, w, scales, mins, bias):
    return F.linear(x, dequantize_int4(w, scales, mins).to(x.dtype), bias)


def linear_int4_decode_ref(x, w, scales, mins, bias):
    """What the decode path computes: quantized activations times the dequantized weight, in fp32."""
    return F.linear(
        quantize_activations_ref(x), dequantize_int4(w, scales, mins), None if bias is None else bias.float()
    )


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, w, scales, mins, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

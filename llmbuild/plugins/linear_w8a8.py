"""`llmbuild::linear_w8a8`: int8 weights x int8 activations (SmoothQuant's W8A8), int32 accumulation.

Weights: the format of `llmbuild::linear_int8` (w int8 [N, K], symmetric per output row, scales [N] in the
activation dtype; `linear_int8.quantize_int8`). Activations: quantized inside the op, one symmetric scale
per token (row of x): x_scale = amax / 127, codes round(x * 127 / amax) (round half to even), a zero row
gets scale 0 and codes 0. Then, exactly:

    acc[t, n] = sum_k xq[t, k] * w[n, k]                       (int32, over all of K)
    y[t, n]   = (float(acc) * x_scale[t]) * float(scales[n]) (+ bias[n])    (fp32, then x.dtype)

The CPU kernel (csrc/linear_w8a8.cpp) computes the same integer sums in every tier, so it differs from
`linear_w8a8_ref` only by the rounding of the last fp32 operations (none, where it keeps this order).

Decode-sized batches (at most DECODE_ROWS rows, K a multiple of 32, bf16 or fp32 x) take
`llmbuild::linear_int8`'s decode kernel instead: activations quantized per 32 columns rather than per token
(finer), 32-column int32 sums accumulated in fp32 (`decode_ref`). It streams the weight once at the memory
bandwidth; a GEMM call at one row is slower inside an engine (bench/results/w8a8-tinyllama.md). The Triton
twin computes `linear_w8a8_ref` at every size.
"""

from __future__ import annotations

import torch

from llmbuild.plugins.linear_int8 import linear_int8_decode_ref

OP_NAME = "llmbuild::linear_w8a8"
VERSION = 1
DECODE_ROWS = 4
"""Most rows of x that take the decode path (csrc/linear_w8a8.cpp kDecodeRows)."""


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 codes [..., K], fp32 scales [...]): symmetric per row, as the kernels quantize."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # NOTE: codes are x * (127 / amax), not x / (amax / 127): the two round differently in fp32. And a
    # tensor numerator: `127.0 / amax` is torch's reciprocal(amax) * 127, which rounds differently again.
    inv = torch.where(amax > 0, amax.new_tensor(127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(xf * inv).clamp(-127, 127).to(torch.int8)
    return codes, (amax / 127.0)[..., 0]


def takes_decode_path(x: torch.Tensor) -> bool:
    """Whether the CPU op runs x through linear_int8's decode kernel (see the module docstring)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return 0 < rows <= DECODE_ROWS and x.shape[-1] % 32 == 0 and x.dtype != torch.float16


def decode_ref(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU decode path's arithmetic (fp32): linear_int8's, activations quantized per 32 columns."""
    return linear_int8_decode_ref(x, w, scales, bias)


def linear_w8a8_ref(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The format's arithmetic in plain torch ops (int32 sums, fp32 scaling), returned in x.dtype: what the
    Triton twin and the CPU kernel's GEMM path compute (the CPU decode path: `decode_ref`)."""
    codes, x_scale = quantize_per_token_ref(x)
    # int64 sums: exact, and the kernels' int32 sums cannot overflow (|sum| <= K * 127^2 < 2^31 for K < 133k)
    acc = torch.matmul(codes.long(), w.long().t()).to(torch.int32)
    y = acc.float() * x_scale[..., None] * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def register_fake_kernel() -> None:
    @torch.library.register_fake(OP_NAME)
    def _fake(x, w, scales, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

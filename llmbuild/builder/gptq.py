"""GPTQ (Frantar et al., 2022): rounding with Hessian-based error compensation, on calibration text.

For a projection with inputs X (all calibration tokens), the layer-wise objective |X W^T - X Q^T|^2
has Hessian H = X^T X. Columns are quantized left to right; each column's rounding error is spread
over the columns not yet quantized through the upper Cholesky factor of H^-1, in blocks of BLOCK
columns with lazy updates of the rest. A group's scale and min are fit when the group starts, on
the error-compensated weights (int8: per row, on the original weights). H is damped by DAMP x its
mean diagonal. Layers are processed in order and each quantized layer's outputs feed the next, so
later layers see (and compensate for) earlier layers' errors. Columns are not reordered
(no act-order), which keeps groups contiguous for the kernels.
"""

from __future__ import annotations

from functools import partial
from typing import cast

import torch
from torch import nn

from llmbuild.builder.calibration import LayerwisePass, observe_inputs
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.quant_format import Grid
from llmbuild.builder.stages import Progress, no_progress
from llmbuild.errors import BuildError

BLOCK = 128
DAMP = 0.01
SITES = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")


def gptq_quantize(
    model: LlamaModel, grids: dict[str, Grid], windows: torch.Tensor, progress: Progress = no_progress
) -> dict[str, nn.Module]:
    """Quantize the layers in `grids` with GPTQ; their nn.Linear weights are left holding the
    dequantized values (what the next layer's calibration inputs are computed with). `progress`
    counts the decoder layers done."""
    runner = LayerwisePass(model, windows)
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(model.layers):
        linears = {f"layers.{i}.{site}": cast(nn.Linear, layer.get_submodule(site)) for site in SITES}
        linears = {name: m for name, m in linears.items() if name in grids}
        hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
        remove = observe_inputs(linears, partial(_accumulate, hessians))
        runner.run(layer)
        remove()
        for name, m in linears.items():
            out[name] = _quantize_linear(name, m, hessians[name], grids[name])
        runner.advance(runner.run(layer))
        progress(i + 1, len(model.layers))
    if "lm_head" in grids and model.lm_head is not None:
        h = torch.zeros(model.lm_head.in_features, model.lm_head.in_features)
        for x in runner.final_hidden():
            h.addmm_(x.float().T, x.float())
        out["lm_head"] = _quantize_linear("lm_head", model.lm_head, h, grids["lm_head"])
    return out


def _accumulate(hessians: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    hessians[name].addmm_(x.float().T, x.float())


def _quantize_linear(name: str, m: nn.Linear, hessian: torch.Tensor, grid: Grid) -> nn.Module:
    q, scales, lows = gptq(m.weight.float(), hessian, grid, name)
    n, k = q.shape
    deq = q.reshape(n, -1, grid.group) * scales[..., None] + lows[..., None]
    m.weight.data = deq.reshape(n, k).to(m.weight.dtype)
    return grid.module_from_codes(q, scales, lows, m.bias)


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, grid: Grid, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of w [N, K] (fp32) for inputs with Hessian X^T X [K, K]: (codes [N, K], scales, mins [N, K / group])."""
    w, h = w.clone(), hessian.clone()
    n, k = w.shape
    g = grid.group
    dead = h.diagonal() == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(h, name)
    q = torch.zeros_like(w)
    scales = torch.zeros(n, k // g)
    lows = torch.zeros(n, k // g)
    scale = low = torch.zeros(n, 1)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a group starts: fit it on the weights updated so far
                scale, low = grid.fit(w1[:, i : i + g] if g <= BLOCK else w[:, col : col + g])
                scales[:, col // g], lows[:, col // g] = scale[:, 0], low[:, 0]
            qc = grid.round(w1[:, i : i + 1], scale, low)
            q[:, col] = qc[:, 0]
            e = (w1[:, i : i + 1] - (qc * scale + low)) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scales, lows


def _inverse_cholesky(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1; more damping when H is too ill-conditioned."""
    damp = DAMP * h.diagonal().mean()
    for _ in range(4):
        try:
            damped = h + damp * torch.eye(len(h))
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise BuildError(
        f"GPTQ: the calibration Hessian of {name} is not positive definite even with damping; "
        "give more calibration data (quantization.calibration.num_samples / seq_len) or use method awq or rtn"
    )

"""Bind an exported graph's plugin ops to the kernels of its target device.

Model graphs call the plugin ops by name in the `llmbuild` namespace, whose kernels are the C++ CPU
ones (plugins/csrc). A cuda engine runs the Triton twins registered under `llmbuild_triton` with the
same schemas (plugins/triton/ops.py, schemas tested equal), so the builder swaps each call's target
after export, as TensorRT binds a plugin to a device's implementation at build time; the graph's
shapes, mutations and weights stay as exported. The projection op, a CPU decode kernel, becomes
aten's linear (cuBLAS on a GPU) with the same arguments.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from llmbuild.errors import RecipeError

# llmbuild op -> the op a cuda graph calls instead (same arguments, same meaning)
_CUDA_SAME_SCHEMA = (
    "paged_attention",
    "quantized_paged_attention",
    "rms_norm",
    "add_rms_norm",
    "rope",
    "swiglu",
    "linear_int4",
    "linear_int8",
    "linear_w8a8",
    "linear_fp8",
    "lora",
)


def cuda_ops() -> dict[torch._ops.OpOverload, torch._ops.OpOverload]:
    """The swap table for cuda targets (importing the Triton ops registers them)."""
    import llmbuild.plugins.triton.ops  # noqa: F401  (registers torch.ops.llmbuild_triton)

    table = {
        getattr(torch.ops.llmbuild, name).default: getattr(torch.ops.llmbuild_triton, name).default
        for name in _CUDA_SAME_SCHEMA
    }
    table[torch.ops.llmbuild.linear.default] = torch.ops.aten.linear.default
    return table


def eval_device(device: str) -> torch.device:
    """Where the builder runs a model graph eagerly (KV calibration, quality check) for a `device`
    target: a cuda engine's on the GPU, its ops running the Triton twins there; a cpu engine's here."""
    if device == "cpu":
        return torch.device("cpu")
    from llmbuild.plugins.triton.ops import register_cuda_kernels

    register_cuda_kernels(cuda_ops())
    return torch.device(device)


def retarget(program: ExportedProgram, device: str) -> ExportedProgram:
    """The program with its plugin ops bound to `device`'s kernels (in place; cpu: unchanged)."""
    if device == "cpu":
        return program
    if device != "cuda":
        raise RecipeError(f"target.device={device}: no kernels for it (cpu or cuda)")
    table = cuda_ops()
    calls = [(node, _called_op(node)) for node in program.graph_module.graph.nodes if node.op == "call_function"]
    plugin_calls = [
        (node, op) for node, op in calls if isinstance(op, torch._ops.OpOverload) and op.namespace == "llmbuild"
    ]
    missing = sorted({str(op) for _, op in plugin_calls if op not in table})
    if missing:
        raise RecipeError(f"target.device=cuda: no cuda kernel yet for {', '.join(missing)}; build for cpu")
    for node, op in plugin_calls:
        if node.target is op:
            node.target = table[op]
        else:  # the op is the first argument of auto_functionalized
            node.args = (table[op], *node.args[1:])
    program.graph_module.recompile()
    return program


def _called_op(node: torch.fx.Node) -> object:
    """The op a call runs: its target, or for auto_functionalized(_v2) (how a functional graph calls an op
    that mutates its inputs) the op it wraps."""
    if getattr(node.target, "__name__", "").startswith("auto_functionalized") and node.args:
        return node.args[0]
    return node.target

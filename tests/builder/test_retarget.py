"""retarget: an exported graph's plugin ops bound to the Triton kernels of cuda targets. The swapped graph
runs on the GPU where there is one, else under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.export.passes import move_to_device_pass

from llmbuild.builder.export import export_graph
from llmbuild.builder.quantize import quantize_model
from llmbuild.builder.retarget import cuda_ops, eval_device, retarget
from llmbuild.errors import RecipeError
from llmbuild.plugins import load_plugins
from llmbuild.recipe import QuantizationSection
from tests.helpers import CFG, DEVICE, LIMITS, tiny_model

BLOCK = 4


def plugin_namespaces(program) -> set[str]:
    names = set()
    for node in program.graph_module.graph.nodes:
        for target in (node.target, *(node.args[:1] if node.args else ())):
            if isinstance(target, torch._ops.OpOverload) and target.namespace.startswith("llmbuild"):
                names.add(target.namespace)
    return names


def run_steps(program, device: str = "cpu") -> list[torch.Tensor]:
    """A prefill of two prompts (5 and 3 tokens), then one decode step of both: each step's logits (on the CPU).

    On `device` (the GPU where there is one) the program runs moved there, as a cuda build moves it."""
    if device != "cpu":
        program = move_to_device_pass(program, device)
    caches = [torch.zeros(8, CFG.num_kv_heads, BLOCK, CFG.head_dim, device=device) for _ in range(2 * CFG.num_layers)]
    tables = torch.zeros(2, LIMITS.max_seq_len // BLOCK, dtype=torch.int32)
    tables[:, :2] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    prefill = (
        torch.randint(0, CFG.vocab_size, (8,), generator=g),
        torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
        torch.tensor([0, 1, 2, 3, 4, 8, 9, 10]),  # sequence 0 in blocks 0-1, sequence 1 in blocks 2-3
        tables,
        torch.tensor([5, 3], dtype=torch.int32),
        torch.tensor([0, 5, 8], dtype=torch.int32),
        torch.tensor([4, 7]),
        torch.zeros(8, dtype=torch.int32),  # no LoRA adapters
    )
    decode = (
        torch.randint(0, CFG.vocab_size, (2,), generator=g),
        torch.tensor([5, 3]),
        torch.tensor([5, 11]),
        tables,
        torch.tensor([6, 4], dtype=torch.int32),
        torch.tensor([0, 1, 2], dtype=torch.int32),
        torch.tensor([0, 1]),
        torch.zeros(2, dtype=torch.int32),
    )
    module = program.module()
    with torch.no_grad():
        return [module(*(t.to(device) for t in step), caches).cpu() for step in (prefill, decode)]


def test_cuda_graph_calls_the_triton_kernels_and_computes_the_same_logits():
    cpu = export_graph(tiny_model(), LIMITS, BLOCK, torch.float32)
    cuda = retarget(export_graph(tiny_model(), LIMITS, BLOCK, torch.float32), "cuda")
    assert plugin_namespaces(cpu) == {"llmbuild"}
    assert plugin_namespaces(cuda) == {"llmbuild_triton"}  # the projections became aten.linear
    for expected, out in zip(run_steps(cpu), run_steps(cuda, DEVICE), strict=True):
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_a_cpu_target_keeps_the_graph():
    program = export_graph(tiny_model(), LIMITS, BLOCK, torch.float32)
    assert retarget(program, "cpu") is program and plugin_namespaces(program) == {"llmbuild"}


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
def test_quantized_graphs_run_the_triton_gemms(weights):
    model = tiny_model()
    # int4 packs 64 columns at a time: the down projections (K=96) stay in fp32
    quantize_model(model, QuantizationSection(weights=weights, group_size=32, exclude=["layers.*.mlp.down"]))
    cpu = export_graph(model, LIMITS, BLOCK, torch.float32)
    cuda = retarget(export_graph(model, LIMITS, BLOCK, torch.float32), "cuda")
    assert plugin_namespaces(cuda) == {"llmbuild_triton"}
    for expected, out in zip(run_steps(cpu), run_steps(cuda, DEVICE), strict=True):
        # the CPU decode kernels quantize int8/int4 activations (VNNI), the Triton GEMMs do not; fp8 runs
        # torch._scaled_mm here and the CPU kernel's fp32 emulation there: Hopper's fp8 tensor cores
        # accumulate in about 14 bits, and a difference upstream flips e4m3 activation codes downstream (up
        # to 6.25% each): 5.1% of the largest logit on an H200
        tol = 0.08 if weights == "fp8" else 0.05
        torch.testing.assert_close(out, expected, atol=tol * expected.abs().max().item(), rtol=0)


def test_ops_without_a_cuda_kernel_are_named(monkeypatch):
    # every op has a cuda twin today; an op added to the CPU library without one must fail the build by name
    monkeypatch.setattr("llmbuild.builder.retarget._CUDA_SAME_SCHEMA", ("rms_norm",))
    program = export_graph(tiny_model(), LIMITS, BLOCK, torch.float32)
    missing = "no cuda kernel yet for llmbuild.add_rms_norm.default, llmbuild.paged_attention"
    with pytest.raises(RecipeError, match=missing):
        retarget(program, "cuda")


def test_eval_device_gives_each_plugin_op_its_twin_as_cuda_kernel():
    # what lets a cuda build calibrate and check its model on the GPU; registering needs no GPU
    load_plugins()
    assert eval_device("cpu") == torch.device("cpu")
    assert eval_device("cuda") == torch.device("cuda")
    for op in cuda_ops():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), op


@pytest.mark.parametrize("weights", ["none", "fp8"])
def test_a_retargeted_graph_moves_to_the_gpu_whole(weights):
    # a cuda build moves the program with move_to_device_pass; "meta" stands in for the GPU here. Any value
    # left on the CPU (a constant built without a device) would make the cuda package mix devices.
    model = tiny_model()
    if weights != "none":
        quantize_model(model, QuantizationSection(weights=weights))
    program = move_to_device_pass(retarget(export_graph(model, LIMITS, BLOCK, torch.float32), "cuda"), "meta")
    on_cpu = []
    for node in program.graph_module.graph.nodes:
        values = node.meta.get("val")
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                on_cpu.append(node.name)
    assert not on_cpu
    assert all(t.device.type == "meta" for t in (*program.state_dict.values(), *program.constants.values()))

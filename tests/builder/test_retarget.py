"""retarget: an exported graph's plugin ops bound to the Triton kernels of cuda targets. The swapped graph
runs here under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import pytest
import torch

from llmbuild.builder.export import export_graph
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.quantize import quantize_model
from llmbuild.builder.retarget import retarget
from llmbuild.errors import RecipeError
from llmbuild.model_config import ModelConfig, RopeConfig
from llmbuild.recipe import LimitsSection, PluginsSection, QuantizationSection

BLOCK = 4
CFG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=10000.0),
    max_position_embeddings=64,
)
LIMITS = LimitsSection(max_batch_size=4, max_seq_len=32, max_num_tokens=32)
FUSED = PluginsSection(gemv=True, fused_rms_norm=True, fused_rope=True, fused_swiglu=True)


def tiny_model() -> LlamaModel:
    model = LlamaModel.empty(CFG, LIMITS.max_seq_len, torch.float32, FUSED)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.data = (
            1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.2 * torch.randn(p.shape, generator=g)
        )
    return model


def plugin_namespaces(program) -> set[str]:
    names = set()
    for node in program.graph_module.graph.nodes:
        for target in (node.target, *(node.args[:1] if node.args else ())):
            if isinstance(target, torch._ops.OpOverload) and target.namespace.startswith("llmbuild"):
                names.add(target.namespace)
    return names


def run_steps(program) -> list[torch.Tensor]:
    """A prefill of two prompts (5 and 3 tokens), then one decode step of both: each step's logits."""
    caches = [torch.zeros(8, CFG.num_kv_heads, BLOCK, CFG.head_dim) for _ in range(2 * CFG.num_layers)]
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
    )
    decode = (
        torch.randint(0, CFG.vocab_size, (2,), generator=g),
        torch.tensor([5, 3]),
        torch.tensor([5, 11]),
        tables,
        torch.tensor([6, 4], dtype=torch.int32),
        torch.tensor([0, 1, 2], dtype=torch.int32),
        torch.tensor([0, 1]),
    )
    module = program.module()
    with torch.no_grad():
        return [module(*step, caches) for step in (prefill, decode)]


def test_cuda_graph_calls_the_triton_kernels_and_computes_the_same_logits():
    cpu = export_graph(tiny_model(), LIMITS, BLOCK, torch.float32)
    cuda = retarget(export_graph(tiny_model(), LIMITS, BLOCK, torch.float32), "cuda")
    assert plugin_namespaces(cpu) == {"llmbuild"}
    assert plugin_namespaces(cuda) == {"llmbuild_triton"}  # the projections became aten.linear
    for expected, out in zip(run_steps(cpu), run_steps(cuda), strict=True):
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_a_cpu_target_keeps_the_graph():
    program = export_graph(tiny_model(), LIMITS, BLOCK, torch.float32)
    assert retarget(program, "cpu") is program and plugin_namespaces(program) == {"llmbuild"}


def test_ops_without_a_cuda_kernel_are_named():
    model = tiny_model().to(torch.bfloat16)
    quantize_model(model, QuantizationSection(weights="int8"))
    program = export_graph(model, LIMITS, BLOCK, torch.bfloat16)
    with pytest.raises(RecipeError, match="no cuda kernel yet for llmbuild.linear_int8"):
        retarget(program, "cuda")

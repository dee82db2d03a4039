"""Sharding a built model's weights into tensor-parallel ranks (builder/shard.py), for every weight format.

Each rank's tensors must load strictly into that rank's graph, and the ranks' projections must
recompose the full ones: column-parallel outputs are slices of the full output, row-parallel
partial outputs sum to it (the graph's all-reduce).
"""

from __future__ import annotations

import pytest
import torch

from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.quantize import quantize_model
from llmbuild.builder.shard import shard_state_dict
from llmbuild.recipe import QuantizationSection
from llmbuild.tensor_parallel import kv_heads_of_rank, rank_config
from tests.helpers import config

FORMATS = {  # weights -> (dtype, relative tolerance of a recomposed output)
    "none": (torch.float32, 1e-5),
    "int8": (torch.float32, 1e-5),
    "int4": (torch.bfloat16, 2e-2),  # partial outputs are rounded to bf16 before they are summed
    # int8 activations: a row-parallel rank quantizes its own input columns (their own absmax per token)
    "w8a8": (torch.float32, 2e-2),
}


def section(weights: str) -> QuantizationSection:
    if weights == "w8a8":
        return QuantizationSection(weights="int8", activations="int8")
    return QuantizationSection(weights=weights, group_size=32)


def random_model(cfg, dtype, weights: str) -> LlamaModel:
    torch.manual_seed(0)
    model = LlamaModel.empty(cfg, 64, dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    if weights != "none":
        quantize_model(model, section(weights))
    return model


def rank_models(full: LlamaModel, tp: int, weights: str) -> list[LlamaModel]:
    """Each rank's graph (at its shapes, in its format) with its shard of `full`'s weights loaded strictly."""
    dtype = full.embed.weight.dtype
    state = full.state_dict()
    ranks = []
    for r in range(tp):
        model = LlamaModel.empty(rank_config(full.cfg, tp), 64, dtype, tp=tp)
        if weights != "none":
            quantize_model(model, section(weights))
        model.load_state_dict(shard_state_dict(state, full.cfg, tp, r), strict=True)
        ranks.append(model)
    return ranks


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.float().abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() <= rel * scale, (actual, expected)


@pytest.mark.parametrize("weights", sorted(FORMATS))
@pytest.mark.parametrize("tp", [2, 4])
def test_rank_projections_recompose_the_full_ones(weights, tp):
    dtype, rel = FORMATS[weights]
    cfg = config(heads=8, kv_heads=2).model_copy(update={"qkv_bias": True, "mlp_bias": True})
    full = random_model(cfg, dtype, weights)
    ranks = rank_models(full, tp, weights)
    x = torch.randn(5, cfg.hidden_size, dtype=dtype)
    d, inter = cfg.head_dim, cfg.intermediate_size
    with torch.no_grad():
        q, k, v = full.layers[1].attn.qkv(x).split([cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d], -1)
        gate, up = full.layers[1].mlp.gate_up(x).split(inter, -1)
        a = torch.randn(5, cfg.num_heads * d, dtype=dtype)
        h = torch.randn(5, inter, dtype=dtype)
        o_parts, down_parts = [], []
        for r, rank in enumerate(ranks):
            share = rank.cfg
            heads = slice(r * share.num_heads * d, (r + 1) * share.num_heads * d)
            kv = kv_heads_of_rank(cfg, tp, r)
            q_r, k_r, v_r = (
                rank.layers[1]
                .attn.qkv(x)
                .split([share.num_heads * d, share.num_kv_heads * d, share.num_kv_heads * d], -1)
            )
            assert_near(q_r, q[:, heads], rel)
            assert_near(k_r, k[:, kv.start * d : kv.stop * d], rel)
            assert_near(v_r, v[:, kv.start * d : kv.stop * d], rel)
            cols = slice(r * share.intermediate_size, (r + 1) * share.intermediate_size)
            gate_r, up_r = rank.layers[1].mlp.gate_up(x).split(share.intermediate_size, -1)
            assert_near(gate_r, gate[:, cols], rel)
            assert_near(up_r, up[:, cols], rel)
            o_parts.append(rank.layers[1].attn.o(a[:, heads]).float())
            down_parts.append(rank.layers[1].mlp.down(h[:, cols]).float())
        assert_near(sum(o_parts), full.layers[1].attn.o(a), rel)
        assert_near(sum(down_parts), full.layers[1].mlp.down(h), rel)  # its bias counted once


def test_replicated_tensors_are_whole_on_every_rank():
    full = random_model(config(), torch.float32, "int8")
    for rank in rank_models(full, 2, "int8"):
        for name in ("embed.weight", "lm_head.weight", "norm.weight", "layers.0.attn_norm.weight"):
            assert torch.equal(rank.state_dict()[name], full.state_dict()[name]), name

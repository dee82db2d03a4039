"""SmoothQuant: the folded model computes what the original does, its factors balance activation
and weight ranges as the formula says, and W8A8 with smoothing beats W8A8 without where outliers are."""

from __future__ import annotations

import pytest
import torch

from llmbuild.builder.awq import SITES
from llmbuild.builder.calibration import observe_inputs
from llmbuild.builder.checkpoint import Checkpoint
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.quality import compare
from llmbuild.builder.quant_format import W8A8Linear
from llmbuild.builder.quantize import quantize_model
from llmbuild.builder.smoothquant import smooth_model
from llmbuild.builder.weights import load_weights
from llmbuild.recipe import PluginsSection, QuantizationSection
from tests.builder.quantization_fixtures import (
    SMALL_CALIBRATION,
    demo_model,
    sequence_logits,
    small_calibration,
    with_outlier_channels,
)
from tests.conftest import ARCHS

LINEARS = tuple(f"layers.{i}.{site}" for i in range(2) for site in SITES)  # the tiny checkpoints' 2 layers


def tiny(ckpt_dir) -> LlamaModel:
    ckpt = Checkpoint.open(ckpt_dir)
    model = LlamaModel.empty(ckpt.config, 256, torch.float32, PluginsSection())
    load_weights(model, ckpt)
    return model


def with_outliers(model: LlamaModel) -> LlamaModel:
    """The same function with a few input channels of every projection 8x larger (their weight columns 8x
    smaller: exact in binary), so the factors differ a lot between channels and between kv heads."""
    cfg, hidden, inter = model.cfg, torch.tensor([3, 17, 40]), torch.tensor([5, 60, 100])
    v0 = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim  # kv head 0's v rows, read by q heads 0 .. rep-1
    rep = cfg.num_heads // cfg.num_kv_heads
    for layer in model.layers:
        for norm, proj in ((layer.attn_norm, layer.attn.qkv), (layer.mlp_norm, layer.mlp.gate_up)):
            norm.weight.data[hidden] *= 8
            proj.weight.data[:, hidden] /= 8
        layer.mlp.gate_up.weight.data[cfg.intermediate_size + inter] *= 8
        layer.mlp.down.weight.data[:, inter] /= 8
        layer.attn.qkv.weight.data[v0 : v0 + cfg.head_dim] *= 8
        if layer.attn.qkv.bias is not None:
            layer.attn.qkv.bias.data[v0 : v0 + cfg.head_dim] *= 8
        layer.attn.o.weight.data[:, : rep * cfg.head_dim] /= 8
    return model


def windows(n: int = 4, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 496, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # GQA (4 heads, 2 kv); + qkv bias; + QK-norm
def test_smoothing_leaves_the_fp32_model_function_unchanged(make_ckpt, arch):
    ckpt = make_ckpt(arch, **ARCHS[arch])
    original, smoothed = with_outliers(tiny(ckpt)), with_outliers(tiny(ckpt))
    smooth_model(smoothed, windows(), 0.5, LINEARS)
    # the factors differ a lot: a fold on the wrong side, rows or heads would change the function
    cfg = original.cfg
    v = slice((cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim, None)
    for layer, before in zip(smoothed.layers, original.layers, strict=True):
        for ratio in (
            layer.attn_norm.weight / before.attn_norm.weight,
            layer.mlp_norm.weight / before.mlp_norm.weight,
            (layer.attn.qkv.weight[v] / before.attn.qkv.weight[v])[:, 0],
        ):
            assert ratio.max() > 2 * ratio.min()
    for seed in (1, 2):
        ids = windows(1, 48, seed)[0]
        expected, got = sequence_logits(original, ids), sequence_logits(smoothed, ids)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothed_ranges_balance_as_alpha_says(make_ckpt, alpha):
    # x' = x / s, w' = w s with s = max|x| ** a / max|w| ** (1 - a) give max|x'| ** a == max|w'| ** (1 - a)
    model = tiny(make_ckpt("llama"))
    calibration = windows()
    smooth_model(model, calibration, alpha, LINEARS)
    absmax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        seen = x.abs().amax(0)
        absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen

    remove = observe_inputs({n: model.get_submodule(n) for n in LINEARS}, observe)
    for ids in calibration:
        sequence_logits(model, ids)
    remove()
    cfg = model.cfg
    for name in LINEARS:
        x, w = absmax[name], model.get_submodule(name).weight.abs().amax(0)
        if name.endswith("attn.o"):  # the q heads reading one kv head share a factor: compare group maxima
            x, w = (t.reshape(cfg.num_kv_heads, -1, cfg.head_dim).amax(1) for t in (x, w))
        torch.testing.assert_close(x.pow(alpha), w.pow(1 - alpha), rtol=2e-3, atol=0, msg=name)


def test_only_the_chosen_projections_are_smoothed(make_ckpt):
    ckpt = make_ckpt("llama")
    original, model = tiny(ckpt), tiny(ckpt)
    smooth_model(model, windows(), 0.5, [n for n in LINEARS if not n.endswith(("down", "qkv"))])
    inter = original.cfg.intermediate_size
    for a, b in zip(original.layers, model.layers, strict=True):
        assert torch.equal(a.attn_norm.weight, b.attn_norm.weight)  # qkv not smoothed
        assert torch.equal(a.mlp.down.weight, b.mlp.down.weight)
        ratio = b.mlp.gate_up.weight[inter:] / a.mlp.gate_up.weight[inter:]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))  # up: gate_up's column factors only
        assert not torch.equal(a.attn.o.weight, b.attn.o.weight)


def test_smoothquant_beats_plain_w8a8_on_a_checkpoint_with_outlier_channels(held_out):
    reference = demo_model()
    rtn, smoothed = with_outlier_channels(demo_model()), with_outlier_channels(demo_model())
    quantize_model(rtn, QuantizationSection(weights="int8", activations="int8"))
    names = quantize_model(
        smoothed,
        QuantizationSection(weights="int8", activations="int8", method="smoothquant", calibration=SMALL_CALIBRATION),
        small_calibration(),
    )
    assert len(names) == 16 and all(isinstance(smoothed.get_submodule(n), W8A8Linear) for n in names)
    assert all(smoothed.get_submodule(n).weight.dtype == torch.int8 for n in names)
    q_rtn, q_smooth = compare(reference, rtn, held_out), compare(reference, smoothed, held_out)
    assert q_smooth.mean_kl < 0.5 * q_rtn.mean_kl
    assert q_smooth.top1_agreement > q_rtn.top1_agreement
    assert q_smooth.mean_kl < 0.05


def test_progress_counts_the_decoder_layers(make_ckpt):
    seen: list[tuple[int, int]] = []
    smooth_model(tiny(make_ckpt("llama")), windows(2, 32), 0.5, LINEARS, lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]

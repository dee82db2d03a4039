"""PEFT adapters read into the engine's slot layout: real adapters saved by `peft` on a tiny random Llama,
checked against peft's own merge (merge_and_unload weights minus the base's), sharded, written into
slot buffers, and broken in every way the loader refuses."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llmbuild.builder.checkpoint import parse_hf_config
from llmbuild.errors import LoraError
from llmbuild.lora_layout import PROJECTIONS, allocate_buffers, buffer_specs
from llmbuild.model_config import ModelConfig
from llmbuild.recipe import LoraSection
from llmbuild.runtime.lora_adapter import LoraAdapter, clear_slot, load_adapter
from llmbuild.tensor_parallel import rank_config

# q (4 heads x 24 = 96), kv (2 x 24 = 48), hidden (64) and intermediate (80) all differ, so a transposed
# or misplaced matrix cannot pass for the right one.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    vocab_size=128,
    max_position_embeddings=64,
    architectures=["LlamaForCausalLM"],
)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in ALL}
SLOTS = LoraSection(max_loras=2, max_rank=8)
Deltas = dict[tuple[int, str], torch.Tensor]


@pytest.fixture(scope="module")
def base() -> tuple[Any, ModelConfig]:
    """A tiny random fp32 Llama and its ModelConfig (as the builder parses it)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    return model, parse_hf_config(model.config.to_dict())[0]


@pytest.fixture(scope="module")
def make_adapter(base, tmp_path_factory) -> Callable[..., tuple[Path, Deltas]]:
    """make_adapter(name, **LoraConfig kwargs) -> (saved dir, peft's merged-minus-base delta per (layer, module)),
    made once per name (tests copy the directory before changing it)."""
    model, _ = base
    made: dict[str, tuple[Path, Deltas]] = {}

    def make(name: str, peft_type: str = "lora", **kwargs: Any) -> tuple[Path, Deltas]:
        if name not in made:
            made[name] = save(name, peft_type, **kwargs)
        return made[name]

    def save(name: str, peft_type: str, **kwargs: Any) -> tuple[Path, Deltas]:
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(len(name))
        if peft_type == "ia3":
            config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        else:
            config = peft.LoraConfig(init_lora_weights=False, **kwargs)
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
        wrapped.save_pretrained(out)
        merged = wrapped.merge_and_unload().state_dict()
        before = model.state_dict()
        deltas = {
            (i, m): merged[key] - before[key]
            for i in range(SHAPE["num_hidden_layers"])
            for m in ALL
            if (key := f"model.layers.{i}.{PARENT[m]}.{m}.weight") in merged
        }
        return out, deltas

    return make


def module_deltas(slot: dict[str, torch.Tensor], cfg: ModelConfig, lora: LoraSection) -> Deltas:
    """Each module's W delta from one slot's tensors, computed as the op contract says: slice j of a fused
    projection adds b[:r, cols_j].T @ a[j*R : j*R + r] (b is stored transposed; r = ranks[j]; zero where r is 0)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": cfg.hidden_size}
    rows |= {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}
    big_r = lora.max_rank
    deltas = {}
    for i in range(cfg.num_layers):
        for projection, modules in PROJECTIONS.items():
            prefix = f"layers.{i}.{projection}_lora"
            if f"{prefix}.a" not in slot:
                continue
            a, b, ranks = (slot[f"{prefix}.{s}"].float() for s in ("a", "b", "ranks"))
            offset = 0
            for j, m in enumerate(modules):
                r = int(ranks[j])
                deltas[i, m] = b[:r, offset : offset + rows[m]].T @ a[j * big_r : j * big_r + r]
                offset += rows[m]
    return deltas


def slot_of(buffers: dict[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
    return {name: t[slot] for name, t in buffers.items()}


CASES = {
    "all-modules": dict(r=4, lora_alpha=8, target_modules=ALL),
    "subset": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={"k_proj": 2, "model.layers.1.mlp.up_proj": 7},
        alpha_pattern={"o_proj": 3, "layers.0.mlp.gate_proj": 32},
    ),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.1\..*\.(q_proj|o_proj)"),
    "some-layers": dict(r=5, lora_alpha=4, target_modules=["k_proj", "gate_proj"], layers_to_transform=[0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_slots_reproduce_peft_merge(base, make_adapter, case: str) -> None:
    """Written into a slot, every module's scale * B @ A equals peft's merged weight minus the base weight,
    untouched modules add nothing, and the other slots stay empty."""
    _, cfg = base
    path, expected = make_adapter(case, **CASES[case])
    adapter = load_adapter(case, path, cfg, SLOTS, torch.float32)
    buffers = allocate_buffers(cfg, SLOTS, torch.float32)
    adapter.write_to(buffers, 1)

    got = module_deltas(slot_of(buffers, 1), cfg, SLOTS)
    for i in range(cfg.num_layers):
        for m in ALL:
            want = expected[i, m]
            torch.testing.assert_close(got.get((i, m), torch.zeros_like(want)), want, atol=1e-6, rtol=1e-5)
    for slot in (0, 2):
        assert all(not t[slot].any() for t in buffers.values())


def test_ranks_and_scales_follow_the_patterns(base, make_adapter) -> None:
    """rank_pattern sets a module's rank (in module_ranks and the ranks buffer); alpha_pattern its scale,
    folded into B: alpha 32 over rank 4 is 8x the B peft saved."""
    _, cfg = base
    path, _ = make_adapter("patterns", **CASES["patterns"])
    adapter = load_adapter("p", path, cfg, SLOTS, torch.float32)
    assert adapter.module_ranks["layers.0.k_proj"] == 2
    assert adapter.module_ranks["layers.1.up_proj"] == 7
    assert adapter.module_ranks["layers.0.up_proj"] == 4
    assert adapter.tensors["layers.1.mlp.gate_up_lora.ranks"].tolist() == [4, 7]
    saved = load_file(path / "adapter_model.safetensors")
    b_gate = saved["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"]
    slot_b = adapter.tensors["layers.0.mlp.gate_up_lora.b"]
    torch.testing.assert_close(slot_b[:4, : cfg.intermediate_size], b_gate.T * 8)
    assert not slot_b[4:, : cfg.intermediate_size].any()


def test_buffer_shapes_and_dtype(base, make_adapter) -> None:
    """Tensors of one slot have the slot buffers' shapes (lora_layout) at each tp rank, in the engine's dtype;
    ranks stay int32; projections the adapter leaves alone are absent."""
    _, cfg = base
    path, _ = make_adapter("subset", **CASES["subset"])
    for tp in (1, 2, 4):
        specs = buffer_specs(rank_config(cfg, tp), SLOTS, torch.bfloat16)
        adapter = load_adapter("s", path, cfg, SLOTS, torch.bfloat16, tp=tp, rank=tp - 1)
        assert not any("gate_up" in name for name in adapter.tensors)
        for name, t in adapter.tensors.items():
            shape, dtype = specs[name]
            assert (tuple(t.shape), t.dtype) == (shape[1:], dtype), name


def test_bf16_slots_match_the_merge_within_rounding(base, make_adapter) -> None:
    _, cfg = base
    path, expected = make_adapter("all-modules", **CASES["all-modules"])
    adapter = load_adapter("bf", path, cfg, SLOTS, torch.bfloat16)
    got = module_deltas(dict(adapter.tensors), cfg, SLOTS)
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def test_adapter_name_in_keys_is_accepted(base, make_adapter, tmp_path: Path) -> None:
    """Keys that keep the adapter's name (lora_A.default.weight) read as peft's plain ones."""
    _, cfg = base
    path, _ = make_adapter("all-modules", **CASES["all-modules"])
    renamed = tmp_path / "renamed"
    shutil.copytree(path, renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    named = {k.replace(".weight", ".default.weight"): v for k, v in weights.items()}
    save_file(named, renamed / "adapter_model.safetensors", metadata={"format": "pt"})
    plain = load_adapter("a", path, cfg, SLOTS, torch.float32).tensors
    other = load_adapter("a", renamed, cfg, SLOTS, torch.float32).tensors
    assert plain.keys() == other.keys()
    for name in plain:
        assert torch.equal(plain[name], other[name])


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_rebuild_the_whole(base, make_adapter, tp: int) -> None:
    """Column-parallel b: each slice's columns over the ranks are the tp=1 slice's columns (tp=4, more ranks than
    kv heads: each rank's k and v are those of kv head rank // 2); row-parallel a: its columns over the
    ranks. The other half, and the ranks, are whole on every rank."""
    _, cfg = base
    path, _ = make_adapter("all-modules", **CASES["all-modules"])
    whole = load_adapter("w", path, cfg, SLOTS, torch.float32).tensors
    shards = [load_adapter("w", path, cfg, SLOTS, torch.float32, tp=tp, rank=r).tensors for r in range(tp)]
    d, inter = cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    q_share, inter_share = q // tp, inter // tp
    kv_share = kv // tp if tp <= cfg.num_kv_heads else d

    def kv_start(r: int) -> int:
        return r * kv_share if tp <= cfg.num_kv_heads else (r // (tp // cfg.num_kv_heads)) * d

    for i in range(cfg.num_layers):
        qkv, gate_up = f"layers.{i}.attn.qkv_lora", f"layers.{i}.mlp.gate_up_lora"
        for r, shard in enumerate(shards):
            b = whole[f"{qkv}.b"]
            cols = [b[:, r * q_share : (r + 1) * q_share]]
            cols += [b[:, q + kv_start(r) : q + kv_start(r) + kv_share]]
            cols += [b[:, q + kv + kv_start(r) : q + kv + kv_start(r) + kv_share]]
            assert torch.equal(shard[f"{qkv}.b"], torch.cat(cols, dim=1))
            b = whole[f"{gate_up}.b"]
            cols = [
                b[:, r * inter_share : (r + 1) * inter_share],
                b[:, inter + r * inter_share : inter + (r + 1) * inter_share],
            ]
            assert torch.equal(shard[f"{gate_up}.b"], torch.cat(cols, dim=1))
            for name in (qkv, gate_up):
                assert torch.equal(shard[f"{name}.a"], whole[f"{name}.a"])
                assert torch.equal(shard[f"{name}.ranks"], whole[f"{name}.ranks"])
        for name in (f"layers.{i}.attn.o_lora", f"layers.{i}.mlp.down_lora"):
            assert torch.equal(torch.cat([s[f"{name}.a"] for s in shards], dim=1), whole[f"{name}.a"])
            for shard in shards:
                assert torch.equal(shard[f"{name}.b"], whole[f"{name}.b"])
                assert torch.equal(shard[f"{name}.ranks"], whole[f"{name}.ranks"])


def test_write_to_replaces_a_slot_and_clear_slot_empties_it(base, make_adapter) -> None:
    _, cfg = base
    full = load_adapter("f", make_adapter("all-modules", **CASES["all-modules"])[0], cfg, SLOTS, torch.float32)
    part = load_adapter("p", make_adapter("subset", **CASES["subset"])[0], cfg, SLOTS, torch.float32)
    buffers = allocate_buffers(cfg, SLOTS, torch.float32)
    full.write_to(buffers, 1)
    full.write_to(buffers, 2)
    part.write_to(buffers, 2)  # the gate_up slot full left there must go
    assert not buffers["layers.0.mlp.gate_up_lora.a"][2].any()
    assert not buffers["layers.0.mlp.gate_up_lora.ranks"][2].any()
    assert torch.equal(buffers["layers.0.attn.qkv_lora.ranks"][2], torch.tensor([8, 0, 8], dtype=torch.int32))
    assert torch.equal(buffers["layers.0.mlp.gate_up_lora.a"][1], full.tensors["layers.0.mlp.gate_up_lora.a"])
    clear_slot(buffers, 1)
    assert all(not t[1].any() for t in buffers.values())
    assert buffers["layers.0.attn.qkv_lora.ranks"][2].any()


def test_write_to_checks_every_buffer_before_writing(base, make_adapter) -> None:
    _, cfg = base
    adapter = load_adapter("f", make_adapter("all-modules", **CASES["all-modules"])[0], cfg, SLOTS, torch.float32)
    buffers = allocate_buffers(cfg, SLOTS, torch.float32)
    buffers["layers.1.mlp.down_lora.b"] = buffers["layers.1.mlp.down_lora.b"].bfloat16()
    with pytest.raises(ValueError, match="down_lora.b"):
        adapter.write_to(buffers, 1)
    assert all(not t.any() for t in buffers.values())
    for bad_slot in (0, 3):
        with pytest.raises(ValueError, match="not an adapter slot"):
            adapter.write_to(allocate_buffers(cfg, SLOTS, torch.float32), bad_slot)
        with pytest.raises(ValueError, match="not an adapter slot"):
            clear_slot(buffers, bad_slot)


# --- refusals: each a peft-saved adapter broken one way ---


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(path: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    weights = load_file(path / "adapter_model.safetensors")
    save_file(change(weights), path / "adapter_model.safetensors", metadata={"format": "pt"})


def key(layer: int, module: str, half: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}.lora_{half}.weight"


def drop(name: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda w: {k: v for k, v in w.items() if k != name}


BROKEN: dict[str, tuple[Callable[[Path], Any], str]] = {
    "missing-dir": (lambda p: shutil.rmtree(p), r"no such adapter directory; pass the directory"),
    "no-config": (lambda p: (p / "adapter_config.json").unlink(), r"no adapter_config\.json; pass a PEFT"),
    "bin-only": (
        lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
        r"has adapter_model\.bin but no adapter_model\.safetensors; .*safe_serialization=True",
    ),
    "no-weights": (lambda p: (p / "adapter_model.safetensors").unlink(), r"no adapter_model\.safetensors; pass"),
    "corrupt-json": (lambda p: (p / "adapter_config.json").write_text('{"r": 4,'), r"not JSON .*; re-save"),
    "json-not-object": (lambda p: (p / "adapter_config.json").write_text("[1]"), r"not a JSON object"),
    "bad-field": (lambda p: edit_config(p, lora_alpha="lots"), r"adapter_config\.json: lora_alpha: .*re-save"),
    "truncated-weights": (
        lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:500]),
        r"adapter_model\.safetensors is corrupt or truncated \(.*\); re-save",
    ),
    "ia3-type": (lambda p: edit_config(p, peft_type="IA3"), r"is a 'IA3' adapter, not LoRA; only LoRA"),
    "no-peft-type": (lambda p: edit_config(p, peft_type=None), r"is a None adapter, not LoRA"),
    "dora": (lambda p: edit_config(p, use_dora=True), r"DoRA adapter \(use_dora: true\).*merge_and_unload"),
    "bias": (lambda p: edit_config(p, bias="lora_only"), r"trains biases \(bias: 'lora_only'\).*bias='none'"),
    "lora-bias": (lambda p: edit_config(p, lora_bias=True), r"trains biases \(lora_bias: true\)"),
    "modules-to-save": (lambda p: edit_config(p, modules_to_save=["lm_head"]), r"lm_head: modules_to_save"),
    "fan-in-fan-out": (lambda p: edit_config(p, fan_in_fan_out=True), r"fan_in_fan_out: true"),
    "pissa": (lambda p: edit_config(p, init_lora_weights="pissa"), r"initialised with pissa.*weight_conversion"),
    "qalora": (lambda p: edit_config(p, use_qalora=True), r"uses use_qalora"),
    "layer-beyond": (
        lambda p: edit_weights(p, lambda w: {k.replace("layers.1.", "layers.5."): v for k, v in w.items()}),
        r"adapts layer 5, but the model has 2 layers; use an adapter trained on this engine's base",
    ),
    "a-without-b": (
        lambda p: edit_weights(p, drop(key(1, "v_proj", "B"))),
        r"has lora_A of layers\.1\.v_proj but no lora_B; re-save",
    ),
    "b-without-a": (lambda p: edit_weights(p, drop(key(0, "o_proj", "A"))), r"lora_B of layers\.0\.o_proj but no"),
    "rank-mismatch": (
        lambda p: edit_weights(p, lambda w: {**w, key(0, "up_proj", "B"): w[key(0, "up_proj", "B")][:, :3].clone()}),
        r"layers\.0\.up_proj has lora_A \[4, 64\] and lora_B \[80, 3\], the base model needs \[r, 64\] and \[80, r\]",
    ),
    "transposed": (
        lambda p: edit_weights(p, lambda w: {**w, key(1, "q_proj", "A"): w[key(1, "q_proj", "A")].T.contiguous()}),
        r"layers\.1\.q_proj has lora_A \[64, 4\]",
    ),
    "duplicate": (
        lambda p: edit_weights(
            p, lambda w: {**w, key(0, "q_proj", "A").replace(".weight", ".x.weight"): w[key(0, "q_proj", "A")].clone()}
        ),
        r"holds two lora_A for layers\.0\.q_proj .*; save one adapter per directory",
    ),
    "int-tensor": (
        lambda p: edit_weights(p, lambda w: {**w, key(0, "k_proj", "A"): w[key(0, "k_proj", "A")].to(torch.int32)}),
        r"torch\.int32 \[4, 64\], not a float matrix",
    ),
    "magnitude": (
        lambda p: edit_weights(
            p, lambda w: {**w, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(96)}
        ),
        r"DoRA magnitude",
    ),
    "stray-tensor": (
        lambda p: edit_weights(p, lambda w: {**w, "base_model.model.lm_head.weight": torch.ones(128, 64)}),
        r"holds base_model\.model\.lm_head\.weight, a whole weight rather than a LoRA matrix",
    ),
    "no-lora-weights": (lambda p: edit_weights(p, lambda w: {}), r"holds no LoRA weights"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapters_are_refused_in_one_line(base, make_adapter, tmp_path: Path, case: str) -> None:
    _, cfg = base
    good, _ = make_adapter("all-modules", **CASES["all-modules"])
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    edit, message = BROKEN[case]
    edit(broken)
    with pytest.raises(LoraError, match=rf"^adapter 'bad' \({re.escape(str(broken))}\): .*{message}") as err:
        load_adapter("bad", broken, cfg, SLOTS, torch.float32)
    assert "\n" not in str(err.value)


def refused(make: tuple[Path, Deltas], cfg: ModelConfig, lora: LoraSection = SLOTS) -> str:
    with pytest.raises(LoraError) as err:
        load_adapter("bad", make[0], cfg, lora, torch.float32)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_rank_above_max_rank_is_refused(base, make_adapter) -> None:
    _, cfg = base
    message = refused(make_adapter("all-modules", **CASES["all-modules"]), cfg, LoraSection(max_rank=3))
    assert "has rank 4, above this engine's lora.max_rank 3; rebuild the engine with lora.max_rank >= 4" in message


def test_modules_without_slots_are_refused(base, make_adapter) -> None:
    _, cfg = base
    lora = LoraSection(max_rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    message = refused(make_adapter("subset", **CASES["subset"]), cfg, lora)
    assert "adapts down_proj, which this engine has no adapter slots for (lora.target_modules: q_proj, " in message
    assert "rebuild the engine with down_proj in lora.target_modules" in message


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_modules_outside_the_layers_are_refused(base, make_adapter, module: str) -> None:
    _, cfg = base
    message = refused(make_adapter(f"with-{module}", r=4, target_modules=["q_proj", module]), cfg)
    assert f"adapts {module}, which LoRA slots cannot hold (only q_proj, " in message


def test_other_peft_methods_are_refused(base, make_adapter) -> None:
    _, cfg = base
    assert "is a 'IA3' adapter, not LoRA" in refused(make_adapter("ia3", peft_type="ia3"), cfg)
    assert "DoRA adapter" in refused(make_adapter("dora", r=4, use_dora=True, target_modules=["q_proj"]), cfg)


def test_another_base_models_adapter_is_refused(base, make_adapter) -> None:
    _, cfg = base
    wider = cfg.model_copy(update={"hidden_size": 128})
    message = refused(make_adapter("subset", **CASES["subset"]), wider)
    assert re.search(r"the base model needs \[r, \d+\] and \[\d+, r\]", message)
    assert "128" in message
    assert "use an adapter trained on this engine's base model" in message


def test_loading_leaves_an_adapter_object_only(base, make_adapter) -> None:
    """load_adapter touches no engine state: it returns tensors, and writing is write_to's."""
    _, cfg = base
    adapter = load_adapter("n", make_adapter("subset", **CASES["subset"])[0], cfg, SLOTS, torch.float32)
    assert isinstance(adapter, LoraAdapter)
    assert adapter.name == "n"
    assert adapter.nbytes == sum(t.numel() * t.element_size() for t in adapter.tensors.values())

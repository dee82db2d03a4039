"""The LoRA slot layout builder and runtime share (names and shapes per projection and rank), the recipe's
`lora` section, and what `plan`, `run` and `inspect` make of it."""

from __future__ import annotations

import json

import pytest
import torch

from llmbuild.errors import RecipeError
from llmbuild.lora_layout import buffer_bytes, buffer_specs
from llmbuild.model_config import ModelConfig
from llmbuild.recipe import LoraSection, parse_recipe
from llmbuild.tensor_parallel import rank_config
from tests.conftest import write_recipe
from tests.helpers import config, greedy_tokens, make_peft_adapter, random_prompt, run_cli


def test_buffer_shapes_per_projection_follow_the_fused_rows_and_the_rank():
    cfg = config(heads=8, kv_heads=2, intermediate=512)  # hidden 256, head_dim 32: q 256, kv 64
    lora = LoraSection(max_loras=3, max_rank=8, target_modules=("q_proj", "v_proj", "down_proj"))
    specs = buffer_specs(cfg, lora, torch.bfloat16)
    assert specs["layers.0.attn.qkv_lora.a"] == ((4, 3 * 8, 256), torch.bfloat16)  # q, k (rank 0), v
    assert specs["layers.0.attn.qkv_lora.b"] == ((4, 8, 256 + 64 + 64), torch.bfloat16)
    assert specs["layers.0.attn.qkv_lora.ranks"] == ((4, 3), torch.int32)
    assert specs["layers.1.mlp.down_lora.a"] == ((4, 8, 512), torch.bfloat16)
    assert not any("attn.o_lora" in n or "gate_up_lora" in n for n in specs)  # untargeted: no slots
    per_layer = 2 * 4 * 24 * 256 + 2 * 4 * 8 * 384 + 4 * 3 * 4 + 2 * 4 * 8 * 512 + 2 * 4 * 8 * 256 + 4 * 1 * 4
    assert buffer_bytes(cfg, lora, torch.bfloat16) == cfg.num_layers * per_layer


def test_a_rank_holds_its_share_of_the_rows_and_columns():
    cfg: ModelConfig = config(heads=8, kv_heads=2, intermediate=512)
    lora = LoraSection(max_loras=1, max_rank=4)
    one, two = buffer_specs(cfg, lora, torch.float32), buffer_specs(rank_config(cfg, 2), lora, torch.float32)
    assert two["layers.0.attn.qkv_lora.b"][0] == (2, 4, (256 + 128) // 2)  # column-parallel: B's columns split
    assert two["layers.0.attn.qkv_lora.a"][0] == one["layers.0.attn.qkv_lora.a"][0]  # A whole
    assert two["layers.0.mlp.down_lora.a"][0] == (2, 4, 256)  # row-parallel: A's columns split
    assert two["layers.0.mlp.down_lora.b"][0] == one["layers.0.mlp.down_lora.b"][0]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "unknown module 'lm_head'"),
        ({"target_modules": []}, "at least one"),
        ({"max_rank": 0}, "max_rank"),
        ({"max_loras": 0}, "max_loras"),
    ],
)
def test_a_bad_lora_section_names_the_key(section, message):
    data = {"name": "x", "model": {"checkpoint": "."}, "lora": section}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_plan_counts_the_slots_in_the_weights(capsys, make_ckpt, tmp_path):
    lora = {"max_loras": 2, "max_rank": 8, "target_modules": ["q_proj", "o_proj"]}
    plain = write_recipe(tmp_path / "plain.yaml", make_ckpt("llama"))
    slotted = write_recipe(tmp_path / "slotted.yaml", make_ckpt("llama"), lora=lora)
    plans = []
    for recipe in (plain, slotted):
        code, out, _ = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB", "--json")
        assert code == 0
        plans.append(json.loads(out))
    # TINY (tests/conftest.py): hidden 64, q 4 x 16, kv 2 x 16, 2 layers, fp32; 3 slots of rank 8
    qkv = 3 * 3 * 8 * 64 + 3 * (64 + 32 + 32) * 8 + 3 * 3
    o = 3 * 8 * 64 + 3 * 64 * 8 + 3
    assert plans[1]["lora_slot_bytes"] == 2 * 4 * (qkv + o)
    assert plans[1]["weight_bytes"] - plans[0]["weight_bytes"] == plans[1]["lora_slot_bytes"]
    _, text, _ = run_cli(capsys, "plan", str(slotted), "--memory", "1GiB")
    assert "LoRA slots" in text and "2 adapters of rank <= 8 on q_proj, o_proj" in text


def test_run_generates_with_an_adapter_named_by_model(capsys, make_ckpt, make_engine, tmp_path):
    engine = make_engine("llama-lora-eager", make_ckpt("llama"), lora={"max_loras": 2, "max_rank": 16})
    merged = make_peft_adapter(make_ckpt("llama"), tmp_path / "ad", 3, r=8, lora_alpha=32, target_modules=["q_proj"])
    prompt = random_prompt(10, 5)
    args = ["run", str(engine), "--prompt-ids", json.dumps(prompt), "--max-tokens", "6", "--temperature", "0"]
    code, out, err = run_cli(
        capsys, *args, "--ignore-eos", f"--lora=ad={tmp_path / 'ad'}", "--model", "ad", "--output", "json"
    )
    assert code == 0, err
    assert json.loads(out)["token_ids"] == greedy_tokens(merged, prompt, 6)
    code, _, err = run_cli(capsys, *args, "--model", "ad")
    assert code == 2 and "no --lora ad=DIR" in err
    code, _, err = run_cli(capsys, *args, "--lora", "no-equals-sign")
    assert code == 2 and "expected NAME=DIR" in err
    code, out, _ = run_cli(capsys, "inspect", str(engine))
    assert code == 0 and "lora     2 slots, rank <= 16" in out


def test_run_refuses_an_adapter_for_an_engine_without_slots(capsys, llama_engine, tmp_path):
    code, _, err = run_cli(capsys, "run", str(llama_engine), "--prompt", "hi", f"--lora=ad={tmp_path}")
    assert code == 1 and "has no LoRA slots" in err and len(err.strip().splitlines()) == 1

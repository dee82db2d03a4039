"""`llmbuild plan`: the breakdown and exit 0 when the engine fits, one line and exit 1 when it does not;
cuda recipes sized against --gpu-memory; limits defaulted from the checkpoint."""

from __future__ import annotations

import json

import yaml

from llmbuild.memory_plan import HOST_OVERHEAD_BYTES
from tests.conftest import write_recipe
from tests.helpers import run_cli

PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K,V x layers x kv heads x head_dim x fp32 bytes (tests/conftest.py TINY)


def _one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_an_engine_that_fits_exits_0_with_the_breakdown(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", make_ckpt("llama"))
    code, out, _ = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB")
    assert code == 0
    assert "engine needs" in out and "activations" in out and "overhead" in out and "fits in budget" in out
    code, out, _ = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is True
    assert plan["kv_bytes_per_sequence"] == PER_TOKEN * 256 and plan["kv_cache_sequences"] == 8
    assert plan["largest_step_tokens"] == 256  # max_num_tokens
    assert plan["activation_bytes"] == 2 * 256 * 512 * 4  # fp32 logits + log-softmax rows win over the MLP
    assert plan["overhead_bytes"] == HOST_OVERHEAD_BYTES
    parts = ("weight_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes")
    assert plan["required_bytes"] == sum(plan[k] for k in parts)
    left = 2**30 - plan["weight_bytes"] - plan["activation_bytes"] - plan["overhead_bytes"]
    assert plan["sequences_in_budget"] == left // (PER_TOKEN * 256)


def test_an_engine_that_does_not_fit_exits_1_with_the_shortfall_in_one_line(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "p.yaml", make_ckpt("llama"))
    code, out, err = run_cli(capsys, "plan", str(recipe), "--memory", "400MiB")
    line = _one_line_error(code, err, 1, "engine p needs", "weights", "KV cache", "activations", "overhead")
    assert "400.00 MiB available: short by" in line
    assert line.endswith("lower limits.max_batch_size / max_seq_len or quantize") and out == ""


def test_a_cuda_recipe_is_sized_against_gpu_memory(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "g.yaml", make_ckpt("llama"), target={"device": "cuda", "backend": "compiled"})
    code, out, err = run_cli(capsys, "plan", str(recipe), "--gpu-memory", "2GiB", "--json")
    assert code == 0, err  # no GPU here: sized for the machine that has one
    plan = json.loads(out)
    assert plan["memory_budget_bytes"] == 2 << 30 and plan["overhead_bytes"] == 1 << 30
    code, _, err = run_cli(capsys, "plan", str(recipe), "--gpu-memory", "1GiB")
    _one_line_error(code, err, 1, "of GPU memory available: short by")
    code, _, err = run_cli(capsys, "plan", str(recipe), "--memory", "64GiB")
    assert code == 2 and "--gpu-memory" in err
    cpu_recipe = write_recipe(tmp_path / "c.yaml", make_ckpt("llama"))
    code, _, err = run_cli(capsys, "plan", str(cpu_recipe), "--gpu-memory", "64GiB")
    assert code == 2 and "--memory" in err


def test_limits_default_to_what_the_checkpoint_supports(capsys, make_ckpt, tmp_path):
    recipe = tmp_path / "d.yaml"
    recipe.write_text(yaml.safe_dump({"name": "d", "model": {"checkpoint": str(make_ckpt("llama"))}}))
    code, out, err = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB", "--json")
    assert code == 0, err
    assert json.loads(out)["recipe"]["limits"]["max_seq_len"] == 512  # the checkpoint's max_position_embeddings
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "limits": {"max_seq_len": 1024}}))
    code, out, err = run_cli(capsys, "plan", str(recipe), "--memory", "1GiB")
    _one_line_error(code, err, 2, "limits.max_seq_len (1024) exceeds the model's max_position_embeddings (512)")

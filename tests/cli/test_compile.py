"""`llmbuild compile`: --set overrides (sealed into the engine), several recipes sharing the build cache,
--json as the only thing on stdout, exit codes, and the plain stage log of a non-terminal stderr."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys

import yaml
from rich.console import Console

from llmbuild.cli.build_progress import build_progress
from tests.conftest import write_recipe
from tests.helpers import run_cli


def test_json_summary_is_all_of_stdout_and_sealed_recipe_has_the_overrides(make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", make_ckpt("llama"))
    out_dir = tmp_path / "engine"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    # a real process with pipes: stderr is no terminal, as in a CI log
    result = subprocess.run(
        [sys.executable, "-m", "llmbuild.cli", "compile", str(recipe), "-o", str(out_dir), "--json",
         "--cache-dir", str(tmp_path / "cache"), "--set", "limits.max_seq_len=128", "--set", "serve.max_tokens=7"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # nothing but the JSON document on stdout
    sealed = yaml.safe_load((out_dir / "recipe.yaml").read_text())
    assert sealed["limits"]["max_seq_len"] == 128 and sealed["serve"]["max_tokens"] == 7
    assert summary["engine"] == str(out_dir) and summary["name"] == "r"
    assert summary["manifest_sha256"] == hashlib.sha256((out_dir / "manifest.json").read_bytes()).hexdigest()
    assert summary["plan"]["limits"]["max_seq_len"] == 128 and summary["plan"]["weight_bytes"] > 0
    assert summary["total_bytes"] == sum(summary["sizes_bytes"].values()) > 0
    assert summary["cache_hits"] == [] and summary["quality"] is None
    # the plain form: one line per finished stage, in order, and no escape codes
    assert "\x1b" not in result.stderr
    stage_lines = [line.split()[1:-2] for line in result.stderr.splitlines() if line.startswith("  done ")]
    assert [" ".join(words) for words in stage_lines] == list(summary["stages_seconds"])


def test_several_recipes_build_into_output_name_and_share_the_stage_cache(capsys, make_ckpt, tmp_path):
    ckpt = make_ckpt("llama")
    a = write_recipe(tmp_path / "a.yaml", ckpt)
    b = write_recipe(tmp_path / "b.yaml", ckpt, serve={"temperature": 0.5})  # same weights and graph as a
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "compile", str(a), str(b), "-o", str(out), "--json", "--cache-dir", str(tmp_path / "cache")
    )
    assert code == 0, err
    first, second = json.loads(stdout)
    assert (first["engine"], second["engine"]) == (str(out / "a"), str(out / "b"))
    assert first["cache_hits"] == [] and second["cache_hits"] == ["weights", "graph"]
    assert (out / "a" / "manifest.json").is_file() and (out / "b" / "manifest.json").is_file()
    assert "cached: weights, graph" in err


def test_recipes_with_one_name_are_a_usage_error(capsys, make_ckpt, tmp_path):
    ckpt = make_ckpt("llama")
    (tmp_path / "x").mkdir()
    one, two = write_recipe(tmp_path / "r.yaml", ckpt), write_recipe(tmp_path / "x" / "r.yaml", ckpt)
    code, _, err = run_cli(capsys, "compile", str(one), str(two), "-o", str(tmp_path / "out"))
    assert code == 2 and "are both named 'r'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_override_exits_2_naming_the_key_before_any_build(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", make_ckpt("llama"))
    for command in (["compile", "-o", str(tmp_path / "out")], ["plan"]):
        code, out, err = run_cli(capsys, *command, str(recipe), "--set", "quantization.weights=int3")
        assert code == 2 and out == ""
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "with --set: quantization.weights: must be one of 'none', 'int8', 'int4', 'fp8' (got 'int3')" in err
    assert not (tmp_path / "out").exists()


def test_plan_takes_overrides(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", make_ckpt("llama"))
    code, out, err = run_cli(capsys, "plan", str(recipe), "--json", "--set", "limits.max_seq_len=64")
    assert code == 0, err
    assert json.loads(out)["recipe"]["limits"]["max_seq_len"] == 64


def test_failed_quality_gate_exits_3(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", make_ckpt("llama"), quantization={"weights": "int8"})
    out_dir = tmp_path / "engine"
    code, out, err = run_cli(
        capsys, "compile", str(recipe), "-o", str(out_dir), "--json", "--cache-dir", str(tmp_path / "cache"),
        "--set", "quality.max_kl=1e-12",
    )  # fmt: skip
    assert code == 3 and out == "" and "error: quality gate failed: mean KL" in err
    assert not out_dir.exists()


def test_unknown_option_is_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", str(tmp_path / "r.yaml"), "--bogus")
    assert code == 2 and "no such option" in err.lower()


def test_terminal_form_draws_bars_and_prints_finished_stages():
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=100, highlight=False)  # as cli/console.py's
    with build_progress(terminal) as (on_stage, on_progress):
        assert on_progress is not None
        on_stage("quality", None)
        on_progress("quality", 3, 10)
        on_stage("quality", 1.25)
    text = buffer.getvalue()
    assert "\x1b[" in text  # drawn (and cleared: transient) with escape codes
    assert re.search(r"done\S* quality +1\.25 s", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text))

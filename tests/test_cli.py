"""The command line: every command end to end, and every bad input as a one-line error with exit != 0."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from llmbuild.cli import cli
from llmbuild.serve.config import ServeConfig
from tests.conftest import edit_json, write_recipe
from tests.helpers import run_cli


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    # build progress may precede it, but the error itself is exactly one line, and the last
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_console_script_runs_as_a_real_process(llama_engine):
    cmd = [
        sys.executable,
        "-m",
        "llmbuild.cli",
        "run",
        str(llama_engine),
        "--prompt-ids",
        "[5, 17, 42]",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--ignore-eos",
        "--output",
        "json",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert set(data) == {"token_ids", "text", "finish_reason", "num_draft_tokens", "num_accepted_tokens"}
    assert len(data["token_ids"]) == 8 and data["finish_reason"] == "length"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout) == data  # greedy is deterministic across processes


def test_run_text_with_seed_is_reproducible(capsys, llama_engine):
    args = (
        "run",
        str(llama_engine),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "16",
        "--temperature",
        "0.8",
        "--seed",
        "1",
    )
    code, first, err = run_cli(capsys, *args)
    assert code == 0 and "finish_reason=" in err
    assert run_cli(capsys, *args)[1] == first
    assert run_cli(capsys, *args[:-1], "2")[1] != first


def test_compile_inspect_verify(capsys, make_ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "c.yaml", make_ckpt("llama"))
    out_dir = tmp_path / "engines" / "c"
    code, out, err = run_cli(
        capsys, "compile", str(recipe), "-o", str(out_dir), "--json", "--cache-dir", str(tmp_path / "cache")
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["engine"] == str(out_dir) and "export" in summary["stages_seconds"]
    code, out, _ = run_cli(capsys, "inspect", str(out_dir))
    assert code == 0 and "rank0/weights.safetensors" in out and "runs here: yes" in out
    code, out, _ = run_cli(capsys, "inspect", str(out_dir), "--json")
    assert json.loads(out)["format_version"] == 1
    code, out, _ = run_cli(capsys, "verify", str(out_dir))
    assert code == 0 and "files match their sha256" in out and "smoke generation: 8 tokens" in out


@pytest.fixture
def broken_ckpt(make_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("llama"), dst)
    return dst


def corrupt(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "delete":
        path.unlink()
    else:
        path.write_text(how)


@pytest.mark.parametrize(
    "target,how,fragments",
    [
        (None, "rmtree", ("checkpoint directory not found",)),
        ("config.json", "delete", ("config.json is missing",)),
        ("config.json", "{corrupt", ("corrupt JSON",)),
        ("model.safetensors", "truncate", ("model.safetensors is corrupt or truncated",)),
        (
            "config.json",
            json.dumps({"architectures": ["BertModel"]}),
            ("unsupported architecture 'BertModel'", "LlamaForCausalLM"),
        ),
    ],
)
def test_compile_bad_checkpoint(capsys, broken_ckpt, tmp_path, target, how, fragments):
    if target is None:
        shutil.rmtree(broken_ckpt)
    else:
        corrupt(broken_ckpt / target, how)
    recipe = write_recipe(tmp_path / "r.yaml", broken_ckpt)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "compile", str(recipe), "-o", str(out_dir), "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(code, err, *fragments)
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("name: x\nmodel: {checkpoint: [oops\n", ("invalid YAML",)),
        (
            yaml.safe_dump({"name": "x", "model": {"checkpoint": "c"}, "limts": {}}),
            ("limts: unknown key", "did you mean 'limits'"),
        ),
        (
            yaml.safe_dump({"name": "x", "model": {"checkpoint": "c"}, "quantization": {"group_size": 100}}),
            ("quantization.group_size: must be one of 32, 64, 128",),
        ),
        (
            yaml.safe_dump({"name": "x", "model": {"checkpoint": "c"}, "quantization": {"weights": "fp8"}}),
            ("quantization.weights=fp8 needs a GPU target", "use int8 or int4 on cpu"),
        ),
    ],
)
@pytest.mark.parametrize("command", ["plan", "compile"])
def test_bad_recipe(capsys, tmp_path, text, fragments, command):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, _, err = run_cli(
        capsys, command, str(path), *(["--cache-dir", str(tmp_path / "c")] if command == "compile" else [])
    )
    assert_one_line_error(code, err, *fragments)


def test_tampered_engine_is_refused_by_verify_and_run(capsys, engine_copy):
    weights = engine_copy / "rank0" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    for args in (("verify", str(engine_copy)), ("run", str(engine_copy), "--prompt", "hi")):
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "rank0/weights.safetensors does not match its sha256")


def test_engine_for_another_target(capsys, engine_copy):
    edit_json(engine_copy / "manifest.json", torch_version="1.0.0")
    for args in (("verify", str(engine_copy)), ("run", str(engine_copy), "--prompt", "hi")):
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "built with torch 1.0.0")
    code, out, _ = run_cli(capsys, "inspect", str(engine_copy))
    assert code == 0 and "runs here: no" in out


@pytest.mark.parametrize(
    "extra,fragments,exit_code",
    [
        (("--prompt-ids", json.dumps(list(range(3, 300)))), ("prompt has 297 tokens", "max_seq_len is 256"), 1),
        (("--prompt-ids", "[1, 2, x]"), ("--prompt-ids", "JSON list of integers"), 2),
        (("--prompt-ids", "[1, 99999]"), ("token id 99999 is out of range",), 1),
        (("--prompt", "a", "--prompt-ids", "[1]"), ("exactly one of --prompt and --prompt-ids",), 2),
        (("--prompt", "a", "--temperature", "-1"), ("temperature must be >= 0",), 1),
        (("--prompt", "a", "--top-p", "0"), ("top_p must be in (0, 1]",), 1),
        (("--prompt", "a", "--max-tokens", "many"), ("--max-tokens",), 2),
    ],
)
def test_bad_run_requests(capsys, llama_engine, extra, fragments, exit_code):
    code, _, err = run_cli(capsys, "run", str(llama_engine), *extra)
    assert_one_line_error(code, err, *fragments)
    assert code == exit_code


def test_missing_engine(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_line_error(code, err, "engine directory not found")


def test_internal_errors_are_one_line_without_debug_and_traced_with_it(capsys, engine_copy, monkeypatch):
    from llmbuild.runtime import llm_engine

    def boom(*a, **k):
        raise ZeroDivisionError("kaboom")

    monkeypatch.setattr(llm_engine.LLMEngine, "step", boom)
    code, _, err = run_cli(capsys, "run", str(engine_copy), "--prompt", "x")
    assert_one_line_error(code, err, "internal error: ZeroDivisionError: kaboom", "--debug")
    code, _, err = run_cli(capsys, "--debug", "run", str(engine_copy), "--prompt", "x")
    assert code == 1 and "Traceback" in err
    # --debug is the root group's flag, parsed as such: the same word as a prompt turns nothing on
    code, _, err = run_cli(capsys, "run", str(engine_copy), "--prompt", "--debug")
    assert_one_line_error(code, err, "internal error: ZeroDivisionError: kaboom")


def test_chat_prompt_uses_the_engine_template(capsys, llama_engine):
    code, out, err = run_cli(
        capsys,
        "run",
        str(llama_engine),
        "--prompt",
        "hello",
        "--chat",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--output",
        "json",
    )
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) >= 1


REPO = Path(__file__).parents[1]
MENTION = re.compile(r"`llmbuild ([^`]+)`")


def command_for(words: list[str]) -> tuple[click.Command, list[str]]:
    """The command a `llmbuild ...` line runs (a group's default subcommand included) and its other words."""
    command: click.Command = cli
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        if words[0] in command.commands:
            command, words = command.commands[words[0]], words[1:]
        else:
            default = getattr(command, "default", None)
            assert default, f"llmbuild {' '.join(words)}: no command {words[0]!r}"
            command = command.commands[default]
    return command, words


def test_commands_named_in_docstrings_and_docs_exist():
    sources = [*(REPO / "llmbuild").rglob("*.py"), REPO / "README.md", *(REPO / "docs").rglob("*.md")]
    mentions = {(path.name, m) for path in sources for m in MENTION.findall(path.read_text())}
    assert len(mentions) > 10
    for name, mention in sorted(mentions):
        command, words = command_for(mention.split())
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in words:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in options, f"{name}: `llmbuild {mention}`: no option {word}"


def test_serve_flag_defaults_are_the_server_config_defaults():
    params = {param.name: param for param in cli.commands["serve"].params}
    for field in ("max_queue", "max_body_bytes", "max_n", "shutdown_timeout", "public_probes"):
        assert params[field].default == ServeConfig.model_fields[field].default, field


def test_run_reports_speculation_in_json_and_can_switch_it_off(capsys, demo_engine):
    prompt = "The dictionary is a mapping of keys to values. The dictionary is"
    common = ("run", str(demo_engine), "--prompt", prompt, "--max-tokens", "12", "--temperature", "0")
    code, out, err = run_cli(capsys, *common, "--ignore-eos", "--output", "json", "--num-speculative-tokens", "3")
    assert code == 0, err
    on = json.loads(out)
    assert on["num_draft_tokens"] > 0 and 0 <= on["num_accepted_tokens"] <= on["num_draft_tokens"]
    code, out, err = run_cli(capsys, *common, "--ignore-eos", "--output", "json", "--no-speculative")
    off = json.loads(out)
    assert code == 0 and (off["num_draft_tokens"], off["num_accepted_tokens"]) == (0, 0)
    assert off["token_ids"] == on["token_ids"] and len(on["token_ids"]) == 12
    code, _, err = run_cli(capsys, *common, "--num-speculative-tokens", "0")
    assert code == 2 and "--num-speculative-tokens" in err

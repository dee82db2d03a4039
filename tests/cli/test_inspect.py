"""`llmbuild inspect`: the provenance summary and the JSON form."""

from __future__ import annotations

import json

from llmbuild.builder.provenance import git_commit, source_sha256
from llmbuild.manifest import PROVENANCE
from tests.conftest import edit_json
from tests.helpers import run_cli


def test_inspect_summarizes_the_provenance(capsys, llama_engine):
    code, out, _ = run_cli(capsys, "inspect", str(llama_engine))
    assert code == 0
    built_by = next(line for line in out.splitlines() if line.startswith("built by"))
    assert f"source {source_sha256()[:12]}" in built_by and "torch " in built_by
    commit = git_commit()
    if commit is not None:
        assert f"git {commit[:12]}" in built_by
    assert any(line.startswith("built on") and "attests" in line for line in out.splitlines())


def test_inspect_json_includes_the_statement(capsys, llama_engine):
    code, out, _ = run_cli(capsys, "inspect", str(llama_engine), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["format_version"] == 1
    assert data["provenance"] == json.loads((llama_engine / PROVENANCE).read_text())


def test_inspect_says_when_an_engine_has_no_provenance(capsys, engine_copy):
    (engine_copy / PROVENANCE).unlink()
    code, out, _ = run_cli(capsys, "inspect", str(engine_copy))
    assert code == 0 and "no provenance.json" in out
    code, out, _ = run_cli(capsys, "inspect", str(engine_copy), "--json")
    assert code == 0 and "provenance" not in json.loads(out)


def test_inspect_names_the_speculative_settings_and_w8a8(capsys, llama_engine, engine_copy):
    code, out, _ = run_cli(capsys, "inspect", str(llama_engine))
    assert code == 0 and "speculative" not in out and "quantization none" in out
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    spec |= {"max_batch_size": 4, "min_acceptance_rate": 0.3, "adaptive": True}
    edit_json(engine_copy / "manifest.json", speculative=spec, quantization__weights="int8")
    edit_json(engine_copy / "manifest.json", quantization__activations="int8")
    code, out, _ = run_cli(capsys, "inspect", str(engine_copy))
    assert code == 0, out
    assert "speculative ngram: up to 3 tokens, lookup 2-5, at most 4 decoding sequences, adaptive" in out
    assert "quantization int8 weights + int8 activations (W8A8), method rtn" in out

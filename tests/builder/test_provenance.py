"""provenance.json: the in-toto / SLSA statement every engine seals, and what stays out of it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmbuild.builder.build import build_engine
from llmbuild.builder.provenance import load_provenance
from llmbuild.errors import EngineError
from llmbuild.manifest import PROVENANCE, REPORT, Manifest, sha256_file, verify_files
from llmbuild.recipe import load_recipe
from tests.conftest import write_recipe

CALIBRATION_TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(12))


@pytest.fixture(scope="module")
def built(make_ckpt, build_cache, tmp_path_factory) -> dict[str, Path]:
    """A calibrated (int8 KV cache) engine whose recipe names its checkpoint and calibration text by
    relative paths, so that any build-machine path in provenance.json is one llmbuild put there."""
    root = tmp_path_factory.mktemp("provenance")
    checkpoint = make_ckpt("llama")
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "calibration.txt").write_text(CALIBRATION_TEXT)
    recipe = write_recipe(
        recipes / "prov.yaml",
        Path(os.path.relpath(checkpoint, recipes)),
        quantization={
            "kv_cache": "int8",
            "calibration": {"dataset": "calibration.txt", "num_samples": 4, "seq_len": 64},
        },
    )
    engine = build_engine(load_recipe(recipe), root / "out" / "engine", cache_dir=build_cache).engine_dir
    return {"root": root, "engine": engine, "checkpoint": checkpoint, "calibration": recipes / "calibration.txt"}


def _statement(engine: Path) -> dict[str, Any]:
    return json.loads((engine / PROVENANCE).read_text())


def _dependencies(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}


def test_the_statement_is_sealed_and_names_every_other_sealed_file_by_its_sha256(built):
    engine = built["engine"]
    manifest = Manifest.load(engine)
    verify_files(engine, manifest)  # provenance.json is sealed like the other files
    assert PROVENANCE in manifest.files
    statement = _statement(engine)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subject = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert set(subject) == set(manifest.files) - {PROVENANCE}
    assert subject == {rel: sha256_file(engine / rel) for rel in subject}
    assert statement["predicate"]["buildDefinition"]["buildType"].startswith("urn:llmbuild:compile")
    assert statement["predicate"]["runDetails"]["builder"]["id"]


def test_the_statement_holds_the_resolved_recipe_inputs_target_and_tools(built):
    engine, checkpoint = built["engine"], built["checkpoint"]
    statement = _statement(engine)
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["recipe"] == yaml.safe_load((engine / "recipe.yaml").read_text())
    manifest = Manifest.load(engine)
    assert definition["internalParameters"]["target"] == manifest.target.model_dump(mode="json")
    machine = definition["internalParameters"]["buildMachine"]
    assert machine["cpuModel"] and machine["cpuFlags"] == sorted(machine["cpuFlags"])
    deps = _dependencies(statement)
    files = [p for p in checkpoint.iterdir() if p.is_file()]
    assert {f"checkpoint/{p.name}": sha256_file(p) for p in files} == {
        name: d["digest"]["sha256"] for name, d in deps.items() if name.startswith("checkpoint/")
    }
    assert deps["calibration"]["digest"]["sha256"] == sha256_file(built["calibration"])
    assert deps["calibration"]["annotations"]["dataset"] == "calibration.txt"
    assert (
        deps["torch"]["uri"].startswith("pkg:pypi/torch@") and torch.__version__.split("+")[0] in deps["torch"]["uri"]
    )
    assert deps["compiler"]["annotations"]["version"] and len(deps["compiler"]["digest"]["sha256"]) == 64
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode == 0:  # tests run from a checkout where git works: the commit is recorded
        assert deps["llmbuild"]["digest"]["gitCommit"] == head.stdout.strip()
    report = json.loads((engine / REPORT).read_text())
    assert report["source"]["llmbuild_sha256"] == deps["llmbuild"]["digest"]["sha256"]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_the_statement_holds_no_path_or_time_of_the_build(built, build_cache):
    text = (built["engine"] / PROVENANCE).read_text()
    absolute = [s for s in _strings(json.loads(text)) if s.startswith("/") or "/tmp" in s]
    assert absolute == []
    for place in (built["root"], build_cache, built["checkpoint"], Path.cwd(), Path.home()):
        assert str(place) not in text, place
    # facts of one run are in the unsealed report
    report = json.loads((built["engine"] / REPORT).read_text())
    assert "built_at" in report and "built_at" not in text and "dirty" not in text.lower()


def test_an_engine_without_provenance_loads_none_and_a_corrupt_one_is_named(engine_copy):
    (engine_copy / PROVENANCE).write_text('{"_type": "https://in-toto.io/Statement/v1"}')
    with pytest.raises(EngineError, match="provenance.json: invalid provenance"):
        load_provenance(engine_copy)
    (engine_copy / PROVENANCE).unlink()
    assert load_provenance(engine_copy) is None

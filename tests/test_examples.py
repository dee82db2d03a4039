"""examples/ci/pipeline.sh, the example engine pipeline, run locally on the demo recipe as CI would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def llmbuild(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmbuild.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_the_example_pipeline_builds_signs_and_verifies_both_variants(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = ROOT / "examples" / "ci" / "pipeline.sh"
    # eager: the pipeline's steps are what is tested here, not AOTInductor (tests/builder covers it)
    run = subprocess.run(
        [str(script), str(ROOT / "recipes" / "demo.yaml"), str(out), "--set", "target.backend=eager"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    artifacts = out / "artifacts"
    for name in ("int8", "int4"):
        summary = json.loads((artifacts / f"{name}.build.json").read_text())
        sealed = yaml.safe_load((Path(summary["engine"]) / "recipe.yaml").read_text())
        assert sealed["quantization"]["weights"] == name  # the variant's --set is what was sealed
        assert summary["quality"]["top1_agreement"] > 0  # a quantized variant passed its gate inside the build
        assert (artifacts / f"{name}.tar.gz").stat().st_size > 0
    # what a serving host checks: the archive against the committed public key, and only that key
    assert (
        llmbuild(
            "verify", str(artifacts / "int4.tar.gz"), "--public-key", str(artifacts / "signing-key.pub"), "--no-smoke"
        ).returncode
        == 0
    )
    subprocess.run([sys.executable, "-m", "llmbuild.cli", "keygen", "-o", str(tmp_path / "other")], check=True)
    wrong = llmbuild("verify", str(artifacts / "int4.tar.gz"), "--public-key", str(tmp_path / "other.pub"))
    assert wrong.returncode != 0 and "key" in wrong.stderr

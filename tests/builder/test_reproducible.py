"""Byte-reproducible engines: the same recipe gives the same sealed files wherever the build writes."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from llmbuild.builder.build import build_engine
from llmbuild.builder.compile import inductor_dir
from llmbuild.errors import BuildError
from llmbuild.manifest import MANIFEST, Manifest
from llmbuild.recipe import load_recipe
from tests.conftest import write_recipe


@pytest.mark.slow
def test_compiled_builds_with_other_cache_dirs_and_outputs_are_byte_identical(make_ckpt, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", make_ckpt("llama"), target={"backend": "compiled"}))
    a = build_engine(recipe, tmp_path / "out" / "a", cache_dir=tmp_path / "cache-one")
    b = build_engine(recipe, tmp_path / "elsewhere" / "deeper" / "engine-b", cache_dir=tmp_path / "c2")
    # each cache starts empty: both builds export and compile their graph
    assert "compile" in a.report["stages_seconds"] and "compile" in b.report["stages_seconds"]
    assert b.manifest.files == a.manifest.files
    for rel in [MANIFEST, *Manifest.load(a.engine_dir).files]:
        assert (a.engine_dir / rel).read_bytes() == (b.engine_dir / rel).read_bytes(), rel


def test_inductor_compiles_in_one_private_directory_per_user(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = inductor_dir()
    assert path == tmp_path / f"llmbuild-inductor-{os.getuid()}" and inductor_dir() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o777)  # code compiled there is loaded: a directory others can write to is refused
    with pytest.raises(BuildError, match="not a directory private to this user"):
        inductor_dir()

"""Building and caching the C++ op library."""

from __future__ import annotations

import pytest

from llmbuild.errors import LLMBuildError
from llmbuild.plugins import OP_VERSIONS, library


def test_missing_compiler_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(LLMBuildError, match="needs a C\\+\\+ compiler .*'no-such-compiler-xyz' not found"):
        library._build(tmp_path / "build")


def test_cache_key_follows_the_sources(tmp_path, monkeypatch):
    key = library.library_key()
    assert key == library.library_key()  # stable
    src = tmp_path / "csrc"
    src.mkdir()
    for path in library.sources():
        (src / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(library, "CSRC", src)
    assert library.library_key() == key  # same bytes, same key
    (src / "ops.h").write_text((src / "ops.h").read_text() + "\n// changed\n")
    assert library.library_key() != key


def test_the_loaded_library_registers_every_versioned_op():
    import torch

    for name in OP_VERSIONS:
        namespace, op = name.split("::")
        assert hasattr(getattr(torch.ops, namespace), op), name

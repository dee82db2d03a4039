"""Building, caching and selecting the C++ op library and its kernel tiers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llmbuild.cpu_target import resolve
from llmbuild.errors import LLMBuildError
from llmbuild.machine import cpu_flags
from llmbuild.plugins import OP_VERSIONS, library


def test_missing_compiler_gives_a_clear_error(tmp_path, monkeypatch):
    target = resolve("x86-64-v3")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(LLMBuildError, match="needs a C\\+\\+ compiler .*'no-such-compiler-xyz' not found"):
        library.build_library(target, tmp_path)


def test_cache_key_follows_the_sources_and_the_target(tmp_path, monkeypatch):
    v3 = resolve("x86-64-v3")
    key = library.library_key(v3)
    assert key == library.library_key(v3)  # stable
    assert library.library_key(resolve("x86-64-v4")) != key
    src = tmp_path / "csrc"
    src.mkdir()
    for path in library.sources():
        (src / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(library, "CSRC", src)
    assert library.library_key(v3) == key  # same bytes, same key
    (src / "ops.h").write_text((src / "ops.h").read_text() + "\n// changed\n")
    assert library.library_key(v3) != key
    # a build is keyed by the bytes it compiles, read once
    assert library.library_key(v3, library.read_sources()) == library.library_key(v3)


def test_cache_key_follows_the_compiler(monkeypatch):
    v3 = resolve("x86-64-v3")
    key = library.library_key(v3)
    monkeypatch.setattr(library, "compiler_identity", lambda cxx: "g++ (a newer release) 99.1")
    assert library.library_key(v3) != key


def test_the_library_names_no_path_of_this_machine():
    # torch's headers and the build directory name files in assertion messages; a library built in a CI
    # checkout and one built here from the same key must be the same bytes
    data = library.loaded_library().read_bytes()
    torch_dir = str(Path(torch.__file__).parent).encode()
    assert torch_dir not in data
    assert b"torch/include/c10/" in data  # the mapped name took its place
    assert str(library.default_cache_dir()).encode() not in data
    assert b"/tmp" not in data


def test_cache_key_follows_where_torch_is_installed(monkeypatch):
    v3 = resolve("x86-64-v3")
    key = library.library_key(v3)
    monkeypatch.setattr(library.cpp_extension, "include_paths", lambda: ["/elsewhere/torch/include"])
    assert library.library_key(v3) != key


def test_the_loaded_library_registers_every_versioned_op():
    for name in OP_VERSIONS:
        namespace, op = name.split("::")
        assert hasattr(getattr(torch.ops, namespace), op), name


def test_the_native_library_holds_every_tier_this_cpu_executes():
    expected = [name for name, needs in library.ISAS.items() if needs <= cpu_flags()]
    assert list(library.compiled_isas()) == expected
    assert library.target_isa(cpu_flags()) == expected[0]


def test_a_tier_cap_holds_inside_the_block_and_is_lifted_after():
    best = library.compiled_isas()[0]
    x = torch.randn(1, 64).bfloat16()
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    s = torch.rand(8).bfloat16()
    with library.use_isa("portable"):
        portable = torch.ops.llmbuild.linear_int8(x, w, s, None)
    assert library.compiled_isas()[0] == best
    # the same integer sums in another order: equal to bf16 rounding
    torch.testing.assert_close(torch.ops.llmbuild.linear_int8(x, w, s, None), portable, atol=0, rtol=2**-7)


def test_a_tier_that_is_not_compiled_in_is_refused():
    missing = [name for name in library.ISAS if name not in library.compiled_isas()]
    if not missing:
        pytest.skip("this CPU executes every kernel tier: none is missing from the native library")
    with pytest.raises(RuntimeError, match="is not compiled in"):
        torch.ops.llmbuild_isa.use(missing[0])


CROSS = "aarch64-linux-gnu-g++"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(CROSS) is None, reason=f"no {CROSS} (apt-get install g++-aarch64-linux-gnu)")
def test_the_sources_compile_for_aarch64(tmp_path):
    # no ARM machine here: the portable tier must at least compile there (x86 intrinsics stay behind isa.h)
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-O1", "-fopenmp", "-fPIC", "-march=armv8.2-a+dotprod", "-Wall", "-Werror=return-type"]
    includes = [f"-I{p}" for p in include_paths()]
    for src in (p for p in library.sources() if p.suffix == ".cpp"):
        cmd = [CROSS, *flags, *includes, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{src.name}: {result.stderr[-2000:]}"
        assert "warning" not in result.stderr, result.stderr[-2000:]

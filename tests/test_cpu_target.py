"""target.cpu: what the compiler enables for a target, and what the runtime suggests to a CPU that lacks it."""

from __future__ import annotations

import platform

import pytest

from llmbuild.cpu_target import X86_64_LEVELS, check_name, fitting_level, resolve
from llmbuild.errors import BuildError
from llmbuild.machine import cpu_flags

x86_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 levels exist only on x86-64")


@x86_only
@pytest.mark.parametrize("level", list(X86_64_LEVELS))
def test_the_levels_table_is_what_the_compiler_enables(level):
    # the runtime suggests a level from this table without a compiler: it must match the compiler's view
    assert set(resolve(level).features) == X86_64_LEVELS[level]


@x86_only
def test_levels_and_cpu_names_resolve_to_their_extensions():
    v3, v4 = resolve("x86-64-v3"), resolve("x86-64-v4")
    assert {"avx2", "fma", "f16c"} <= set(v3.features) and not any(f.startswith("avx512") for f in v3.features)
    assert {"avx512f", "avx512bw", "avx512vl"} <= set(v4.features) and "avx512_vnni" not in v4.features
    spr = resolve("sapphirerapids")
    assert {"avx512_vnni", "avx512_bf16", "amx_tile"} <= set(spr.features)
    assert v3.resolved == "x86-64-v3"


def test_native_is_what_this_cpu_runs_and_names_it():
    native = resolve("native")
    assert native.features and set(native.features) <= cpu_flags()
    assert native.missing_on(cpu_flags()) == []
    assert native.resolved and native.resolved != "native"


def test_an_unknown_cpu_is_a_build_error_naming_the_key():
    with pytest.raises(BuildError, match="target.cpu: 'pentium-9000' is not a CPU the compiler knows"):
        resolve("pentium-9000")


@pytest.mark.parametrize("name", ["", "Haswell", "x86 64", "-O3"])
def test_malformed_names_are_refused(name):
    with pytest.raises(ValueError, match="must be native, an x86-64 level"):
        check_name(name)


def test_the_fitting_level_is_the_best_one_a_cpu_runs():
    assert fitting_level(frozenset()) == "x86-64"
    assert fitting_level(X86_64_LEVELS["x86-64-v3"] | {"avx512f"}) == "x86-64-v3"
    assert fitting_level(X86_64_LEVELS["x86-64-v4"]) == "x86-64-v4"

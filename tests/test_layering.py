"""runtime/ and serve/ never import builder/ (an engine runs without the code that built it), and no
module of the package imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import llmbuild

PACKAGE = Path(llmbuild.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Each llmbuild module -> the llmbuild modules it imports (anywhere in it, lazily or not).
    `from pkg import name` counts as importing pkg.name where that is a module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def test_the_package_has_no_import_cycle():
    graph = package_imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    """The check above can fail: a cycle added to the graph is reported."""
    graph = package_imports()
    graph["llmbuild.errors"] = graph["llmbuild.errors"] | {"llmbuild.recipe"}
    monkeypatch.setattr(sys.modules[__name__], "package_imports", lambda: graph)
    with pytest.raises(AssertionError, match="llmbuild.errors"):
        test_the_package_has_no_import_cycle()


def test_runtime_and_serve_sources_do_not_import_builder():
    offenders = []
    shared_files = ("manifest.py", "model_config.py", "memory_plan.py", "recipe.py", "errors.py", "tensor_parallel.py")
    shared = [PACKAGE / f for f in shared_files]
    for path in [
        *(PACKAGE / "runtime").rglob("*.py"),
        *(PACKAGE / "serve").rglob("*.py"),
        *(PACKAGE / "plugins").rglob("*.py"),
        *shared,
    ]:
        if any(m == "llmbuild.builder" or m.startswith("llmbuild.builder.") for m in imported_modules(path)):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_generating_from_an_engine_never_loads_builder(llama_engine):
    code = (
        "import sys\n"
        "from llmbuild.runtime.llm_engine import LLMEngine\n"
        "from llmbuild.runtime.sampling_params import SamplingParams\n"
        f"llm = LLMEngine.from_dir({str(llama_engine)!r})\n"
        "out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))\n"
        "assert len(out[0].token_ids) == 4\n"
        "loaded = [m for m in sys.modules if m.startswith('llmbuild.builder')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

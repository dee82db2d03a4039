"""runtime/ and serve/ never import builder/: an engine runs without the code that built it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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

"""provenance.json: how an engine was built, as an in-toto Statement v1 with a SLSA Provenance v1 predicate.

    _type            https://in-toto.io/Statement/v1
    subject          every other sealed file of the engine: {name: relative path, digest: {sha256}}
    predicateType    https://slsa.dev/provenance/v1
    predicate
      buildDefinition
        buildType             urn:llmbuild:compile:v1 (llmbuild's `compile`, this statement's version)
        externalParameters    {recipe}: the resolved recipe (recipe.yaml's content)
        internalParameters    {target, buildMachine: {machine, cpuModel, cpuFlags}}
        resolvedDependencies  checkpoint/<file> and calibration (sha256), llmbuild (source sha256, git
                              commit when built from a checkout), torch, compiler (driver sha256 and
                              version), cuda (torch's CUDA version, when it has one)
      runDetails              {builder: {id, version}}

The rule: provenance.json is sealed by the manifest, so it holds only facts that a rebuild of the same
recipe and inputs on the same machine, with the same llmbuild, torch and compiler, gives again. No
timestamps, invocation ids, host or user names, absolute paths (output, cache, checkpoint and recipe
locations) or the checkout's dirty flag: those are about one run and go in the unsealed report.json
(`built_at`, `source`). The llmbuild source sha256 is what stands for local edits in the sealed record.
The build machine's CPU model and flags are facts of the machine, and are recorded.

A pipeline that attests its builds (e.g. a CI's signed provenance) can take the subject and
parameters from here; `llmbuild inspect` prints a summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal
from urllib.parse import quote

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

import llmbuild
from llmbuild.cpu_target import compiler
from llmbuild.errors import EngineError
from llmbuild.machine import cpu_flags, cpu_model
from llmbuild.manifest import PROVENANCE, Inputs, Target, sha256_file
from llmbuild.plugins.library import compiler_identity
from llmbuild.recipe import Recipe

STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:llmbuild:compile:v1"
BUILDER_ID = "urn:llmbuild:builder:cli"
GIT_TIMEOUT_S = 5.0


class _Slsa(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, validate_by_name=True)


def _absent(value: object) -> bool:
    return value is None


class Resource(_Slsa):
    """A SLSA ResourceDescriptor: a file or package the build read (or, as a subject, wrote)."""

    name: str
    uri: str | None = Field(None, exclude_if=_absent)
    digest: dict[str, str] | None = Field(None, exclude_if=_absent)
    annotations: dict[str, str] | None = Field(None, exclude_if=_absent)


class BuildMachine(_Slsa):
    machine: str
    cpu_model: str
    cpu_flags: list[str]


class InternalParameters(_Slsa):
    target: Target
    build_machine: BuildMachine


class BuildDefinition(_Slsa):
    build_type: str = BUILD_TYPE
    external_parameters: dict[str, Any]
    """{"recipe": the resolved recipe}"""
    internal_parameters: InternalParameters
    resolved_dependencies: list[Resource]


class Builder(_Slsa):
    id: str = BUILDER_ID
    version: dict[str, str]


class RunDetails(_Slsa):
    builder: Builder


class Predicate(_Slsa):
    build_definition: BuildDefinition
    run_details: RunDetails


class Statement(_Slsa):
    """provenance.json."""

    type: Literal["https://in-toto.io/Statement/v1"] = Field(STATEMENT_TYPE, alias="_type")
    subject: list[Resource]
    predicate_type: Literal["https://slsa.dev/provenance/v1"] = PREDICATE_TYPE
    predicate: Predicate

    def dependency(self, name: str) -> Resource | None:
        """The resolved dependency called `name`, if recorded."""
        deps = self.predicate.build_definition.resolved_dependencies
        return next((d for d in deps if d.name == name), None)


def provenance(recipe: Recipe, target: Target, inputs: Inputs, sealed: dict[str, str]) -> Statement:
    """The statement of an engine built from `recipe` for `target`, whose other sealed files are `sealed`."""
    return Statement(
        subject=[Resource(name=rel, digest={"sha256": digest}) for rel, digest in sealed.items()],
        predicate=Predicate(
            build_definition=BuildDefinition(
                external_parameters={"recipe": recipe.model_dump(mode="json")},
                internal_parameters=InternalParameters(
                    target=target,
                    build_machine=BuildMachine(
                        machine=platform.machine(), cpu_model=cpu_model(), cpu_flags=sorted(cpu_flags())
                    ),
                ),
                resolved_dependencies=[*_inputs(recipe, inputs), *_toolchain()],
            ),
            run_details=RunDetails(builder=Builder(version={"llmbuild": llmbuild.__version__})),
        ),
    )


def seal_provenance(stage: Path, statement: Statement, sealed: dict[str, str]) -> dict[str, str]:
    """Write provenance.json into the staged engine; returns `sealed` with it added, in hash_tree's order."""
    path = stage / PROVENANCE
    path.write_text(statement.model_dump_json(by_alias=True, indent=1) + "\n", encoding="utf-8")
    path.chmod(0o644)
    files = {**sealed, PROVENANCE: sha256_file(path)}
    return {rel: files[rel] for rel in sorted(files, key=PurePosixPath)}


def load_provenance(engine_dir: Path) -> Statement | None:
    """An engine's provenance.json; None for an engine built before llmbuild wrote one."""
    path = engine_dir / PROVENANCE
    if not path.is_file():
        return None
    try:
        return Statement.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise EngineError(f"{path}: invalid provenance ({str(exc).splitlines()[0]}); rebuild the engine") from None


def source_report() -> dict[str, Any]:
    """report.json's `source`: the llmbuild code of this build, with the checkout's dirty flag (unsealed)."""
    report: dict[str, Any] = {"llmbuild_sha256": source_sha256()}
    commit = git_commit()
    if commit is not None:
        report["git_commit"] = commit
        report["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return report


def _inputs(recipe: Recipe, inputs: Inputs) -> list[Resource]:
    """The checkpoint's files and the calibration text, by digest (never by path)."""
    deps = [
        Resource(name=f"checkpoint/{rel}", digest={"sha256": digest}) for rel, digest in inputs.checkpoint_files.items()
    ]
    if inputs.calibration_sha256 is not None:
        dataset = recipe.quantization.calibration_or_default().dataset
        deps.append(
            Resource(name="calibration", digest={"sha256": inputs.calibration_sha256}, annotations={"dataset": dataset})
        )
    return deps


def _toolchain() -> list[Resource]:
    """llmbuild, torch, the C++ compiler and CUDA, by version and where cheap by digest."""
    digest = {"sha256": source_sha256()}
    commit = git_commit()
    if commit is not None:
        digest["gitCommit"] = commit
    deps = [
        Resource(name="llmbuild", uri=_purl("llmbuild", llmbuild.__version__), digest=digest),
        Resource(name="torch", uri=_purl("torch", torch.__version__)),
    ]
    cxx = compiler()
    path = shutil.which(cxx)
    if path is not None:
        version = compiler_identity(cxx).partition("\n")[2].splitlines()
        deps.append(
            Resource(
                name="compiler",
                digest={"sha256": sha256_file(Path(path).resolve())},
                annotations={"command": Path(cxx).name, "version": version[0] if version else "unknown"},
            )
        )
    if torch.version.cuda is not None:
        deps.append(Resource(name="cuda", uri=f"pkg:generic/cuda@{quote(torch.version.cuda, safe='')}"))
    return deps


def _purl(package: str, version: str) -> str:
    return f"pkg:pypi/{package}@{quote(version, safe='')}"


@cache
def source_sha256() -> str:
    """sha256 over the llmbuild package's files (path and content), read once per process: the code
    this process imported, edits or not, whether installed or run from a checkout."""
    root = Path(llmbuild.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and not any(p.startswith(".") for p in rel.parts):
            h.update(f"{rel.as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


@cache
def git_commit() -> str | None:
    """HEAD of the git checkout llmbuild runs from; None when installed, or without git."""
    root = Path(llmbuild.__file__).resolve().parent.parent
    out = _git("rev-parse", "--show-toplevel", "HEAD")
    if out is None:
        return None
    lines = out.splitlines()
    # a package installed into some other repository's tree is not that repository's code
    if len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


def _git(*args: str) -> str | None:
    """stdout of a git command in llmbuild's directory; None if git is missing, fails or hangs."""
    cwd = Path(llmbuild.__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # status must not take the index lock of a checkout
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None

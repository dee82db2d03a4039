"""report.json: what a build did and found (stage timings, sizes, memory plan, how the op library was
checked, quality metrics, calibration text, the llmbuild source and whether its checkout was dirty; a
built-in draft's report under `draft`).
Not sealed by the manifest: it records a timestamp and facts of one run (see builder/provenance.py)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import llmbuild
from llmbuild.builder.plan import BuildPlan
from llmbuild.builder.provenance import source_report
from llmbuild.builder.quality import Quality
from llmbuild.cpu_target import CpuTarget
from llmbuild.machine import cpu_flags
from llmbuild.manifest import REPORT, UNSEALED, Inputs, hash_tree
from llmbuild.plugins.library import target_isa


def build_report(
    plan: BuildPlan,
    engine_dir: Path,
    timings: dict[str, float],
    *,
    has_chat_template: bool,
    op_library: dict[str, Any],
    quality: Quality | None,
    inputs: Inputs,
    draft: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of the engine staged in engine_dir (every other file written); `draft`: the report of its
    built-in draft (speculative.draft), which has no report.json of its own."""
    report: dict[str, Any] = {
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "llmbuild_version": llmbuild.__version__,
        "checkpoint": str(plan.checkpoint.path),
        "params": plan.checkpoint.config.num_params,
        "stages_seconds": timings,
        "total_seconds": round(sum(timings.values()), 3),
        "sizes_bytes": {rel: (engine_dir / rel).stat().st_size for rel in hash_tree(engine_dir, skip=UNSEALED)},
        "memory_plan": plan.memory.as_report(),
        "has_chat_template": has_chat_template,
        "op_library": op_library,
        "source": source_report(),
    }
    if quality is not None:
        report["quality"] = {**asdict(quality), "held_out": "built-in (Python documentation prose)"}
    if draft is not None:
        report["draft"] = draft
    if inputs.calibration_sha256 is not None:
        report["calibration"] = {
            **plan.recipe.quantization.calibration_or_default().model_dump(mode="json"),
            "sha256": inputs.calibration_sha256,
        }
    return report


def library_report(cpu: CpuTarget, check_isa: str) -> dict[str, Any]:
    """How the build verified code for `cpu`: the kernel tier the target gets and the one its checks ran."""
    report: dict[str, Any] = {
        "target_cpu": cpu.name,
        "resolved": cpu.resolved,
        "features": list(cpu.features),
        "kernel_isa": target_isa(cpu.features),
        "checks_ran_kernel_isa": check_isa,
    }
    missing = cpu.missing_on(cpu_flags())
    if missing:
        report["note"] = (
            f"this build machine cannot execute target.cpu={cpu.name} (it lacks {', '.join(missing)}): "
            f"calibration and the quality gate ran the op library's {check_isa} kernels (the same sums as the "
            "target's, in another order); the engine's compiled code was built but not run here"
        )
    return report


def write_report(engine_dir: Path, report: dict[str, Any]) -> None:
    (engine_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

"""`llmbuild compile`: recipe -> checkpoint -> model graph -> export -> engine directory.

Stages are timed into report.json; a stage that fails is named in the error with the likely fix.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.export.passes import move_to_device_pass

import llmbuild
from llmbuild.builder.cache import BuildCache
from llmbuild.builder.calibration import calibration_path, calibration_windows, file_sha256
from llmbuild.builder.compile import compile_graph
from llmbuild.builder.export import export_graph, save_graph
from llmbuild.builder.kv_quant import kv_absmax, quantize_kv_cache
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.package import check_output_dir, staging_dir
from llmbuild.builder.plan import BuildPlan, make_plan
from llmbuild.builder.quality import (
    EVAL_VERSION,
    NUM_WINDOWS,
    WINDOW,
    Quality,
    check_gate,
    compare,
    held_out_windows,
)
from llmbuild.builder.quantize import quantize_model
from llmbuild.builder.retarget import eval_device, retarget
from llmbuild.builder.shard import shard_state_dict
from llmbuild.builder.weights import load_weights
from llmbuild.cpu_target import CpuTarget, resolve
from llmbuild.errors import BuildError, CheckpointError, LLMBuildError
from llmbuild.machine import cpu_flags, gpu_arch
from llmbuild.manifest import (
    EXPORTED,
    GRAPH,
    OP_LIBRARY,
    RECIPE,
    REPORT,
    TOKENIZER_DIR,
    UNSEALED,
    WEIGHTS,
    Inputs,
    Manifest,
    Target,
    hash_tree,
    rank_dir,
    sha256_json,
)
from llmbuild.memory_plan import MemoryPlan
from llmbuild.model_config import DTYPES, KV_CACHE_DTYPES
from llmbuild.plugins import OP_VERSIONS, load_plugins
from llmbuild.plugins.library import build_library, compiled_isas, default_cache_dir, target_isa, use_isa
from llmbuild.recipe import Recipe
from llmbuild.tensor_parallel import rank_config

StageCallback = Callable[[str, float | None], None]
"""Called with (stage, None) when a stage starts and (stage, seconds) when it ends."""
QUALITY = "quality-{isa}.json"
"""The cached quality metrics of a build's weights, per kernel tier the gate ran (tiers differ in summation order)."""

_OOM_HINT = "out of memory: free memory, or build a smaller model / a shorter limits.max_seq_len"


def _hint(exc: Exception) -> str:
    """The likely fix for an exception that escaped a build stage."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text:
        return _OOM_HINT
    if isinstance(exc, OSError):
        return "check free disk space and permissions of the output and cache directories"
    if "compil" in text or "g++" in text or "c++" in text:
        return "the C++ compiler failed; check that g++ works, then rerun with --debug for its output"
    return "rerun with --debug for the traceback"


@dataclass(frozen=True)
class BuildResult:
    engine_dir: Path
    manifest: Manifest
    report: dict[str, Any]


def build_engine(
    recipe: Recipe,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    on_stage: StageCallback | None = None,
) -> BuildResult:
    """Build the engine a recipe describes into out_dir (atomically: complete or not at all).

    Stage outputs are reused from the build cache under `cache_dir` unless use_cache is False.
    """
    on_stage = on_stage or (lambda name, seconds: None)
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    check_output_dir(out_dir.resolve())
    cache_root = cache_dir or default_cache_dir()
    cache = BuildCache(cache_root, read=use_cache)

    with _stage("plan", timings, on_stage):
        plan = make_plan(recipe)
    with _stage("op library", timings, on_stage):
        cpu = resolve(recipe.target.cpu)
        # the op library is cached per machine (like Inductor's code), not per build cache
        op_library = build_library(cpu, reuse=use_cache)
        check_isa = _load_for_checks(cpu, op_library)
    with _stage("hash inputs", timings, on_stage):
        ckpt_files = plan.checkpoint.file_hashes()
        calibration = _calibration_file(recipe)
        inputs = Inputs(
            recipe_sha256=sha256_json(recipe.model_dump(mode="json")),
            checkpoint_sha256=plan.checkpoint.combined_hash(ckpt_files),
            checkpoint_files=ckpt_files,
            calibration_sha256=file_sha256(calibration) if calibration else None,
        )
    target = _target(recipe, cpu)
    graph_key = config_hash(recipe, plan, target)
    weights_key = _weights_key(recipe, plan, inputs)
    dtype = DTYPES[plan.dtype]
    q = recipe.quantization

    tp = recipe.target.tensor_parallel
    rank_cfg = rank_config(plan.checkpoint.config, tp)

    with staging_dir(out_dir) as stage, use_isa(check_isa):
        ranks = [stage / rank_dir(r) for r in range(tp)]
        for rank in ranks:
            rank.mkdir()
        model: LlamaModel | None = None
        quality: Quality | None = None
        quality_file = QUALITY.format(isa=check_isa)
        cached_quality = cache.lookup("weights", weights_key, quality_file)
        names = [f"{rank.name}.safetensors" for rank in ranks]
        cached_weights = [p for name in names if (p := cache.lookup("weights", weights_key, name))]
        if len(cached_weights) == tp and (not q.quantized or cached_quality):
            with _stage("weights (cached)", timings, on_stage):
                for rank, cached in zip(ranks, cached_weights, strict=True):
                    shutil.copyfile(cached, rank / WEIGHTS)
                if cached_quality:
                    quality = Quality(**json.loads(cached_quality.read_text()))
        else:
            with _stage("load weights", timings, on_stage):
                model = LlamaModel.empty(plan.checkpoint.config, recipe.limits.max_seq_len, dtype, recipe.plugins)
                load_weights(model, plan.checkpoint)
            if q.quantized:
                reference = copy.deepcopy(model)
                calibration_ids = None
                if calibration:
                    with _stage("calibration data", timings, on_stage):
                        calibration_ids = calibration_windows(
                            q.calibration_or_default(), recipe.base_dir(), plan.checkpoint.path
                        )
                if q.weights != "none":
                    with _stage(f"quantize ({q.method})", timings, on_stage):
                        quantize_model(model, q, calibration_ids)
                # a cuda engine's graph runs these checks on its GPU (eval_device); the weights are saved from the CPU
                device = eval_device(recipe.target.device)
                if q.kv_cache in ("int8", "fp8"):
                    assert calibration_ids is not None  # _calibration_file names a text for a quantized KV cache
                    with _stage(f"calibrate {q.kv_cache} KV cache", timings, on_stage):
                        # the K/V of the final (quantized) weights: what the cache will hold
                        absmax = kv_absmax(model.to(device), calibration_ids)
                        quantize_kv_cache(model, absmax, KV_CACHE_DTYPES[q.kv_cache])
                with _stage("quality", timings, on_stage):
                    window = min(WINDOW, recipe.limits.max_seq_len)
                    windows = held_out_windows(plan.checkpoint.path, NUM_WINDOWS, window)
                    quality = compare(reference.to(device), model.to(device), windows)
                    model.to("cpu")
                    del reference
                    _store_json(cache, "weights", weights_key, quality_file, asdict(quality))
            with _stage("save weights" if tp == 1 else f"shard + save weights ({tp} ranks)", timings, on_stage):
                state = model.state_dict()
                for r, (rank, name) in enumerate(zip(ranks, names, strict=True)):
                    save_file(shard_state_dict(state, model.cfg, tp, r), rank / WEIGHTS, metadata={"format": "pt"})
                    cache.store("weights", weights_key, rank / WEIGHTS, name=name)
                del state
        if quality is not None:
            check_gate(recipe.quality, quality)  # before the slow stages: a failing build fails fast
        graph_files = (GRAPH, EXPORTED) if recipe.target.backend == "compiled" else (EXPORTED,)
        cached_graph = [p for name in graph_files if (p := cache.lookup("graph", graph_key, name))]
        if len(cached_graph) == len(graph_files):
            with _stage("graph (cached)", timings, on_stage):
                for cached_file in cached_graph:
                    shutil.copyfile(cached_file, ranks[0] / cached_file.name)
        else:
            with _stage("export", timings, on_stage):
                # the graph never depends on weight values: zeros do when none were loaded
                if model is None or tp > 1:
                    model = LlamaModel.empty(rank_cfg, recipe.limits.max_seq_len, dtype, recipe.plugins, tp)
                    for param in model.parameters():
                        param.data.zero_()
                    if q.weights != "none":  # the layout only: round to nearest will do
                        quantize_model(model, q.model_copy(update={"method": "rtn", "calibration": None}))
                    if q.kv_cache in ("int8", "fp8"):
                        absmax = torch.ones(rank_cfg.num_layers, 2, rank_cfg.num_kv_heads)
                        quantize_kv_cache(model, absmax, KV_CACHE_DTYPES[q.kv_cache])
                kv_dtype = KV_CACHE_DTYPES[plan.kv_cache_dtype]
                program = export_graph(model, recipe.limits, recipe.kv_cache.block_size, kv_dtype)
                program = retarget(program, recipe.target.device)
                if recipe.target.device != "cpu":  # traced on the cpu (fake tensors), run on the GPU
                    program = move_to_device_pass(program, recipe.target.device)
            if recipe.target.backend == "compiled":
                with _stage("compile", timings, on_stage):
                    compile_graph(program, ranks[0] / GRAPH, cache_root / "inductor", cpu, tp)
            with _stage("save graph", timings, on_stage):
                save_graph(program, ranks[0] / EXPORTED)
            for name in graph_files:
                cache.store("graph", graph_key, ranks[0] / name)
        for rank in ranks[1:]:  # every rank runs the same code on its own weights
            for name in graph_files:
                shutil.copyfile(ranks[0] / name, rank / name)
        with _stage("package", timings, on_stage):
            (stage / OP_LIBRARY).parent.mkdir()
            shutil.copyfile(op_library, stage / OP_LIBRARY)
            (stage / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
            (stage / TOKENIZER_DIR).mkdir()
            for src in plan.checkpoint.tokenizer_files:
                shutil.copyfile(src, stage / TOKENIZER_DIR / src.name)
            has_chat_template = _check_tokenizer(stage / TOKENIZER_DIR, plan.checkpoint.config.vocab_size)
            for path in stage.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            manifest = _manifest(recipe, plan, target, graph_key, inputs, hash_tree(stage, skip=UNSEALED))
            manifest.save(stage)
        report = _report(plan, stage, timings, has_chat_template)
        report["op_library"] = _library_report(cpu, check_isa)
        if quality is not None:
            report["quality"] = {**asdict(quality), "held_out": "built-in (Python documentation prose)"}
        if calibration:
            report["calibration"] = {
                **recipe.quantization.calibration_or_default().model_dump(mode="json"),
                "sha256": inputs.calibration_sha256,
            }
        (stage / REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return BuildResult(out_dir, manifest, report)


def _store_json(cache: BuildCache, kind: str, key: str, name: str, data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=1) + "\n")
        cache.store(kind, key, path)


def _calibration_file(recipe: Recipe) -> Path | None:
    """The calibration text of an awq / gptq / int8-KV recipe (checked to exist), else None."""
    q = recipe.quantization
    if not q.calibrated:
        return None
    return calibration_path(q.calibration_or_default(), recipe.base_dir())


def _load_for_checks(cpu: CpuTarget, library: Path) -> str:
    """Load an op library for the build's own runs (calibration, quality gate); returns the kernel tier they use.

    That is the target's library and tier where this machine can execute them (in a process that already
    holds another library, the same sources capped at the target's tier); otherwise this machine's
    native library at its best tier, which `_library_report` says.
    """
    runnable = not cpu.missing_on(cpu_flags())
    load_plugins(library if runnable else None)
    have = compiled_isas()
    want = target_isa(cpu.features)
    return want if want in have else have[0]


def _library_report(cpu: CpuTarget, check_isa: str) -> dict[str, Any]:
    """How the build verified code for `cpu`, for report.json."""
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


def _target(recipe: Recipe, cpu: CpuTarget) -> Target:
    cuda = recipe.target.device == "cuda"
    return Target(
        device=recipe.target.device,
        machine=platform.machine(),
        arch=gpu_arch() if cuda else None,  # the build's GPU: check_supported refuses another target.arch
        cuda_version=torch.version.cuda if cuda else None,
        cpu=cpu.name,
        cpu_resolved=cpu.resolved,
        required_isa=cpu.features,
        kernel_isa=target_isa(cpu.features),  # type: ignore[arg-type]
        tensor_parallel=recipe.target.tensor_parallel,
        backend=recipe.target.backend,
    )


def _weights_key(recipe: Recipe, plan: BuildPlan, inputs: Inputs) -> str:
    """What the engine's weights files depend on: checkpoint bytes, dtype, quantization, RoPE table
    length, rank count."""
    return sha256_json(
        {
            "llmbuild": llmbuild.__version__,
            "checkpoint": inputs.checkpoint_sha256,
            "dtype": plan.dtype,
            "quantization": recipe.quantization.model_dump(mode="json"),
            "calibration_text": inputs.calibration_sha256,
            "max_seq_len": recipe.limits.max_seq_len,
            "tensor_parallel": recipe.target.tensor_parallel,
            "quality_eval": EVAL_VERSION,  # the cached quality metrics live beside the weights
        }
    )


def config_hash(recipe: Recipe, plan: BuildPlan, target: Target) -> str:
    """Hash of exactly what changes the built artifact (serve defaults and KV budget excluded)."""
    return sha256_json(
        {
            "llmbuild": llmbuild.__version__,
            "torch": torch.__version__,
            "target": target.model_dump(mode="json"),
            "model": plan.checkpoint.config.model_dump(mode="json"),
            "dtype": plan.dtype,
            "kv_cache_dtype": plan.kv_cache_dtype,
            "limits": recipe.limits.model_dump(mode="json"),
            "block_size": recipe.kv_cache.block_size,
            # the graph depends on which layers are quantized to what, not on how the values were found
            "quantization": recipe.quantization.model_dump(mode="json", include={"weights", "group_size", "exclude"}),
            "plugins": OP_VERSIONS,
            "graph_options": recipe.plugins.model_dump(mode="json"),
        }
    )


def _manifest(
    recipe: Recipe, plan: BuildPlan, target: Target, graph_key: str, inputs: Inputs, files: dict[str, str]
) -> Manifest:
    return Manifest(
        name=recipe.name,
        llmbuild_version=llmbuild.__version__,
        torch_version=torch.__version__,
        target=target,
        model=plan.checkpoint.config,
        dtype=plan.dtype,
        kv_cache_dtype=plan.kv_cache_dtype,
        limits=recipe.limits,
        kv_cache=recipe.kv_cache,
        quantization=recipe.quantization,
        plugins=OP_VERSIONS,
        serve=recipe.serve,
        cuda_graphs=recipe.cuda_graphs,
        config_hash=graph_key,
        inputs=inputs,
        files=files,
    )


def _report(plan: BuildPlan, stage: Path, timings: dict[str, float], has_chat_template: bool) -> dict[str, Any]:
    return {
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "llmbuild_version": llmbuild.__version__,
        "checkpoint": str(plan.checkpoint.path),
        "params": plan.checkpoint.config.num_params,
        "stages_seconds": timings,
        "total_seconds": round(sum(timings.values()), 3),
        "sizes_bytes": {rel: (stage / rel).stat().st_size for rel in hash_tree(stage, skip=UNSEALED)},
        "memory_plan": memory_plan_dict(plan.memory),
        "has_chat_template": has_chat_template,
    }


def memory_plan_dict(memory: MemoryPlan) -> dict[str, int]:
    return {
        "weight_bytes": memory.weight_bytes,
        "kv_bytes_per_token": memory.kv_bytes_per_token,
        "kv_budget_bytes": memory.kv_budget_bytes,
        "kv_blocks": memory.num_blocks,
        "blocks_per_sequence": memory.blocks_per_sequence,
        "max_full_sequences": memory.max_full_sequences,
    }


def _check_tokenizer(tokenizer_dir: Path, vocab_size: int) -> bool:
    """Load the engine's tokenizer copy as the runtime will; its ids must fit the model's vocabulary.

    Returns whether it has a chat template.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
        raise CheckpointError(f"checkpoint tokenizer does not load ({str(exc).splitlines()[0]})") from None
    if len(tok) > vocab_size:
        raise CheckpointError(f"checkpoint tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}")
    return bool(getattr(tok, "chat_template", None))


@contextmanager
def _stage(name: str, timings: dict[str, float], on_stage: StageCallback) -> Iterator[None]:
    on_stage(name, None)
    start = time.perf_counter()
    try:
        yield
    except LLMBuildError:
        raise
    except Exception as exc:
        hint = _hint(exc)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BuildError(f"stage '{name}' failed: {type(exc).__name__}: {detail} ({hint})") from exc
    timings[name] = round(time.perf_counter() - start, 3)
    on_stage(name, timings[name])

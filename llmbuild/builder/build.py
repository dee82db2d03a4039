"""`llmbuild compile`: recipe -> checkpoint -> model graph -> export -> engine directory.

Stages are timed into report.json; a stage that fails is named in the error with the likely fix
(builder/stages.py). The weights and the graph each come from the build cache when it holds them
(a "(cached)" stage), else are computed and stored.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.export import ExportedProgram
from torch.export.passes import move_to_device_pass

import llmbuild
from llmbuild.builder.cache import QUALITY, BuildCache, config_hash, weights_key
from llmbuild.builder.calibration import calibration_path, calibration_windows, file_sha256
from llmbuild.builder.compile import compile_graph
from llmbuild.builder.draft import draft_recipe, draft_section
from llmbuild.builder.export import export_graph, save_graph
from llmbuild.builder.kv_quant import kv_absmax, quantize_kv_cache
from llmbuild.builder.models.llama import LlamaModel
from llmbuild.builder.models.lora_slots import attach_lora_slots
from llmbuild.builder.package import add_runtime_files, check_output_dir, seal, staging_dir
from llmbuild.builder.plan import BuildPlan, make_plan
from llmbuild.builder.provenance import provenance, seal_provenance
from llmbuild.builder.quality import NUM_WINDOWS, WINDOW, Quality, check_gate, compare, held_out_windows
from llmbuild.builder.quantize import quantize_model
from llmbuild.builder.report import build_report, library_report, write_report
from llmbuild.builder.retarget import eval_device, retarget
from llmbuild.builder.shard import shard_state_dict
from llmbuild.builder.stages import ProgressCallback, StageCallback, Stages
from llmbuild.builder.weights import load_weights
from llmbuild.cpu_target import CpuTarget, resolve
from llmbuild.machine import cpu_flags, gpu_arch
from llmbuild.manifest import (
    DRAFT_DIR,
    EXPORTED,
    GRAPH,
    GRAPH_INPUTS,
    WEIGHTS,
    Inputs,
    Manifest,
    Target,
    rank_dir,
    sha256_json,
)
from llmbuild.model_config import DTYPES, KV_CACHE_DTYPES
from llmbuild.plugins import OP_VERSIONS, load_plugins
from llmbuild.plugins.library import build_library, compiled_isas, default_cache_dir, target_isa, use_isa
from llmbuild.recipe import Recipe
from llmbuild.tensor_parallel import rank_config


@dataclass(frozen=True)
class BuildResult:
    """A built engine: where it is, its manifest, and its report.json."""

    engine_dir: Path
    manifest: Manifest
    report: dict[str, Any]


@dataclass(frozen=True)
class _Build:
    """One build's resolved inputs and cache keys, and what its stages share."""

    recipe: Recipe
    plan: BuildPlan
    cpu: CpuTarget
    op_library: Path
    check_isa: str
    """The kernel tier the build's own runs (calibration, quality gate) use."""
    inputs: Inputs
    calibration: Path | None
    target: Target
    graph_key: str
    weights_key: str
    cache: BuildCache
    stages: Stages


def build_engine(
    recipe: Recipe,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    on_stage: StageCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> BuildResult:
    """Build the engine a recipe describes into out_dir (atomically: complete or not at all).

    Stage outputs are reused from the build cache under `cache_dir` unless use_cache is False.
    `on_stage` hears each stage start and end, `on_progress` the steps of the long ones.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir.resolve())
    cache = BuildCache(cache_dir or default_cache_dir(), read=use_cache)
    build = _prepare(recipe, cache, Stages(on_stage, on_progress))
    with staging_dir(out_dir) as stage:
        manifest, report = _build_into(build, stage)
        write_report(stage, report)
    return BuildResult(out_dir, manifest, report)


def _build_into(build: _Build, stage: Path) -> tuple[Manifest, dict[str, Any]]:
    """Write the engine (and its built-in draft, in its draft/ directory) into the empty directory `stage`;
    returns its manifest and report (not written: a draft's report is part of its target's)."""
    with use_isa(build.check_isa):
        ranks = [stage / rank_dir(r) for r in range(build.recipe.target.tensor_parallel)]
        for rank in ranks:
            rank.mkdir()
        model, quality = _weights(build, ranks)
        if quality is not None:
            check_gate(build.recipe.quality, quality)  # before the slow stages: a failing build fails fast
        _graph(build, ranks, model)
    # the draft is built before the target is sealed: the target's manifest seals the draft's files too
    draft = _draft(build, stage / DRAFT_DIR) if draft_section(build.recipe) is not None else None
    return _package(build, stage, quality, draft)


def _draft(build: _Build, out: Path) -> dict[str, Any]:
    """Build the recipe's draft engine into `out` through the same stages (named `draft: <stage>`) and build
    cache as any engine; returns its report. `out` is inside the target's staging directory, so a failed
    draft leaves no engine."""
    out.mkdir()
    with build.stages.nested("draft") as stages:
        _, report = _build_into(_prepare(draft_recipe(build.recipe), build.cache, stages), out)
    return report


def _prepare(recipe: Recipe, cache: BuildCache, stages: Stages) -> _Build:
    """The stages before any engine file is written: plan, op library (loaded for the build's own
    runs), and the hashes of the inputs that key the cache."""
    with stages.run("plan"):
        plan = make_plan(recipe)
    recipe = plan.recipe  # limits resolved against the checkpoint: what the engine records
    with stages.run("op library"):
        cpu = resolve(recipe.target.cpu)
        # the op library is cached per machine (like Inductor's code), not per build cache
        op_library = build_library(cpu, reuse=cache.read)
        check_isa = _load_for_checks(cpu, op_library)
    with stages.run("hash inputs"):
        calibration = _calibration_file(recipe)
        inputs = _hash_inputs(recipe, plan, calibration)
    target = _target(recipe, cpu)
    return _Build(
        recipe=recipe,
        plan=plan,
        cpu=cpu,
        op_library=op_library,
        check_isa=check_isa,
        inputs=inputs,
        calibration=calibration,
        target=target,
        graph_key=config_hash(recipe, plan, target),
        weights_key=weights_key(recipe, plan, inputs),
        cache=cache,
        stages=stages,
    )


def _weights(build: _Build, ranks: list[Path]) -> tuple[LlamaModel | None, Quality | None]:
    """Every rank's weights file, and for quantized weights their quality metrics: from the cache, else
    built and stored. Returns the built model too (None from the cache): the export may reuse it."""
    names = [f"{rank.name}.safetensors" for rank in ranks]
    quality_file = QUALITY.format(isa=build.check_isa)
    cached = [p for name in names if (p := build.cache.lookup("weights", build.weights_key, name))]
    cached_quality = build.cache.lookup("weights", build.weights_key, quality_file)
    if len(cached) == len(ranks) and (not build.recipe.quantization.quantized or cached_quality):
        with build.stages.run("weights (cached)"):
            for rank, path in zip(ranks, cached, strict=True):
                shutil.copyfile(path, rank / WEIGHTS)
            quality = Quality(**json.loads(cached_quality.read_text())) if cached_quality else None
        return None, quality
    recipe, checkpoint = build.recipe, build.plan.checkpoint
    with build.stages.run("load weights"):
        max_seq_len = build.plan.limits.max_seq_len
        model = LlamaModel.empty(checkpoint.config, max_seq_len, DTYPES[build.plan.dtype], recipe.plugins)
        load_weights(model, checkpoint)
    quality = _quantize(build, model, quality_file) if recipe.quantization.quantized else None
    _save_weights(build, model, ranks)
    return model, quality


def _quantize(build: _Build, model: LlamaModel, quality_file: str) -> Quality:
    """Quantize the loaded model's weights and/or KV cache in place; measure (and cache) the quality lost."""
    q, recipe = build.recipe.quantization, build.recipe
    reference = copy.deepcopy(model)
    calibration_ids = None
    if build.calibration is not None:
        with build.stages.run("calibration data") as progress:
            calibration_ids = calibration_windows(
                q.calibration_or_default(), recipe.base_dir(), build.plan.checkpoint.path, progress
            )
    if q.weights != "none":
        with build.stages.run(f"quantize ({q.method})") as progress:
            quantize_model(model, q, calibration_ids, progress)
    # a cuda engine's graph runs these checks on its GPU (eval_device); the weights are saved from the CPU
    device = eval_device(recipe.target.device)
    if q.kv_cache in ("int8", "fp8"):
        assert calibration_ids is not None  # _calibration_file names a text for a quantized KV cache
        with build.stages.run(f"calibrate {q.kv_cache} KV cache") as progress:
            # the K/V of the final (quantized) weights: what the cache will hold
            absmax = kv_absmax(model.to(device), calibration_ids, progress=progress)
            quantize_kv_cache(model, absmax, KV_CACHE_DTYPES[q.kv_cache])
    with build.stages.run("quality") as progress:
        windows = held_out_windows(build.plan.checkpoint.path, NUM_WINDOWS, min(WINDOW, build.plan.limits.max_seq_len))
        quality = compare(reference.to(device), model.to(device), windows, progress)
        model.to("cpu")
        del reference
        build.cache.store_json("weights", build.weights_key, quality_file, asdict(quality))
    return quality


def _save_weights(build: _Build, model: LlamaModel, ranks: list[Path]) -> None:
    """Each rank's shard of the model's weights into its directory and the cache."""
    tp = len(ranks)
    with build.stages.run("save weights" if tp == 1 else f"shard + save weights ({tp} ranks)"):
        state = model.state_dict()
        for r, rank in enumerate(ranks):
            save_file(shard_state_dict(state, model.cfg, tp, r), rank / WEIGHTS, metadata={"format": "pt"})
            build.cache.store("weights", build.weights_key, rank / WEIGHTS, name=f"{rank.name}.safetensors")


def _graph(build: _Build, ranks: list[Path], model: LlamaModel | None) -> None:
    """Every rank's graph files: from the cache, else exported (and compiled) and stored."""
    compiled = build.recipe.target.backend == "compiled"
    names = (GRAPH, EXPORTED) if compiled else (EXPORTED,)
    cached = [p for name in names if (p := build.cache.lookup("graph", build.graph_key, name))]
    if len(cached) == len(names):
        with build.stages.run("graph (cached)"):
            for path in cached:
                shutil.copyfile(path, ranks[0] / path.name)
    else:
        program = _export(build, model if len(ranks) == 1 else None)
        if compiled:
            with build.stages.run("compile"):
                compile_graph(program, ranks[0] / GRAPH, build.cpu, len(ranks))
        with build.stages.run("save graph"):
            save_graph(program, ranks[0] / EXPORTED)
        for name in names:
            build.cache.store("graph", build.graph_key, ranks[0] / name)
    for rank in ranks[1:]:  # every rank runs the same code on its own weights
        for name in names:
            shutil.copyfile(ranks[0] / name, rank / name)


def _export(build: _Build, model: LlamaModel | None) -> ExportedProgram:
    """The step graph of `model`, or of a rank's model of zeros when None, for the target device."""
    recipe = build.recipe
    with build.stages.run("export"):
        # the graph never depends on weight values: zeros do when none were loaded
        if model is None:
            model = _layout_model(build)
        if recipe.lora is not None:
            attach_lora_slots(model.layers, model.cfg, recipe.lora, model.embed.weight.dtype)
        kv_dtype = KV_CACHE_DTYPES[build.plan.kv_cache_dtype]
        program = export_graph(model, build.plan.limits, recipe.kv_cache.block_size, kv_dtype)
        program = retarget(program, recipe.target.device)
        if recipe.target.device != "cpu":  # traced on the cpu (fake tensors), run on the GPU
            # with its index: the graph's tensor-metadata asserts compare devices exactly, and the GPU's
            # tensors are cuda:0, never bare "cuda" (AOTInductor's compile failed on exactly that)
            device = torch.device(recipe.target.device, torch.cuda.current_device())
            program = move_to_device_pass(program, device)
    return program


def _layout_model(build: _Build) -> LlamaModel:
    """One rank's model with zero weights in the engine's formats (the layout is all a graph needs)."""
    recipe, q = build.recipe, build.recipe.quantization
    tp = recipe.target.tensor_parallel
    cfg = rank_config(build.plan.checkpoint.config, tp)
    model = LlamaModel.empty(cfg, build.plan.limits.max_seq_len, DTYPES[build.plan.dtype], recipe.plugins, tp)
    for param in model.parameters():
        param.data.zero_()
    if q.weights != "none":  # the layout only: round to nearest will do
        quantize_model(model, q.model_copy(update={"method": "rtn", "calibration": None}))
    if q.kv_cache in ("int8", "fp8"):
        absmax = torch.ones(cfg.num_layers, 2, cfg.num_kv_heads)
        quantize_kv_cache(model, absmax, KV_CACHE_DTYPES[q.kv_cache])
    return model


def _package(
    build: _Build, stage: Path, quality: Quality | None, draft: dict[str, Any] | None
) -> tuple[Manifest, dict[str, Any]]:
    """The rest of the engine's files, its manifest sealing them (a built-in draft's included), and the report
    (with the draft's report)."""
    with build.stages.run("package"):
        has_chat_template = add_runtime_files(stage, build.op_library, build.recipe, build.plan.checkpoint)
        sealed = seal(stage)
        statement = provenance(build.recipe, build.target, build.inputs, sealed)
        manifest = _manifest(build, seal_provenance(stage, statement, sealed))
        manifest.save(stage)
    report = build_report(
        build.plan,
        stage,
        build.stages.timings,
        has_chat_template=has_chat_template,
        op_library=library_report(build.cpu, build.check_isa),
        quality=quality,
        inputs=build.inputs,
        draft=draft,
    )
    return manifest, report


def _calibration_file(recipe: Recipe) -> Path | None:
    """The calibration text of an awq / gptq / int8-KV recipe (checked to exist), else None."""
    q = recipe.quantization
    if not q.calibrated:
        return None
    return calibration_path(q.calibration_or_default(), recipe.base_dir())


def _hash_inputs(recipe: Recipe, plan: BuildPlan, calibration: Path | None) -> Inputs:
    """The sha256 of everything the build reads: recipe, checkpoint files, calibration text."""
    ckpt_files = plan.checkpoint.file_hashes()
    return Inputs(
        recipe_sha256=sha256_json(recipe.model_dump(mode="json")),
        checkpoint_sha256=plan.checkpoint.combined_hash(ckpt_files),
        checkpoint_files=ckpt_files,
        calibration_sha256=file_sha256(calibration) if calibration else None,
    )


def _load_for_checks(cpu: CpuTarget, library: Path) -> str:
    """Load an op library for the build's own runs (calibration, quality gate); returns the kernel tier they use.

    That is the target's library and tier where this machine can execute them (in a process that already
    holds another library, the same sources capped at the target's tier); otherwise this machine's
    native library at its best tier, which report.json's op_library says.
    """
    runnable = not cpu.missing_on(cpu_flags())
    load_plugins(library if runnable else None)
    have = compiled_isas()
    want = target_isa(cpu.features)
    return want if want in have else have[0]


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


def _manifest(build: _Build, files: dict[str, str]) -> Manifest:
    recipe, plan = build.recipe, build.plan
    return Manifest(
        name=recipe.name,
        llmbuild_version=llmbuild.__version__,
        torch_version=torch.__version__,
        target=build.target,
        model=plan.checkpoint.config,
        dtype=plan.dtype,
        kv_cache_dtype=plan.kv_cache_dtype,
        limits=plan.limits,
        kv_cache=recipe.kv_cache,
        quantization=recipe.quantization,
        plugins=OP_VERSIONS,
        serve=recipe.serve,
        cuda_graphs=recipe.cuda_graphs,
        speculative=recipe.speculative,
        lora=recipe.lora,
        graph_inputs=GRAPH_INPUTS,
        config_hash=build.graph_key,
        inputs=build.inputs,
        files=files,
    )

"""Engine directory format v1: file layout and the manifest that describes and seals it.

    engines/NAME/
      manifest.json            this schema; sha256 of every other file except report.json
      recipe.yaml              the fully resolved recipe
      tokenizer/               tokenizer files + chat template
      rank0/model.pt2          compiled engines: the AOTInductor package (code only, weights not inside)
      rank0/exported.pt2       the exported program (weights not inside): the eager backend, and a
                               debugging fallback for compiled engines
      rank0/weights.safetensors
      ops/llmbuild_ops.so      the C++ op library compiled for target.cpu (the runtime loads this copy)
      provenance.json          how it was built: in-toto statement, SLSA provenance (builder/provenance.py)
      report.json              build report (timings, sizes, build timestamp): not byte-reproducible
      signature.json           an ed25519 signature over manifest.json (signing.py), when unpacked from
                               a signed archive (artifact.py): not sealed
      draft/                   speculative.draft: the draft engine built with this one, an engine
                               directory of its own (no report.json: its report is under `draft` in
                               this one's); its files are sealed by this manifest too

The builder writes it (builder/package.py); the runtime reads it (runtime/engine.py). Nothing here
depends on the machine: checking an engine against the machine is the runtime's job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmbuild.errors import EngineError
from llmbuild.model_config import ModelConfig
from llmbuild.recipe import (
    CudaGraphsSection,
    EngineLimits,
    KVCacheSection,
    LoraSection,
    QuantizationSection,
    ServeSection,
    SpeculativeSection,
)

FORMAT_VERSION: Literal[1] = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
RECIPE = "recipe.yaml"
TOKENIZER_DIR = "tokenizer"
GRAPH = "model.pt2"
EXPORTED = "exported.pt2"
WEIGHTS = "weights.safetensors"
OP_LIBRARY = "ops/llmbuild_ops.so"
PROVENANCE = "provenance.json"
DRAFT_DIR = "draft"
SIGNATURE = "signature.json"
UNSEALED = frozenset({MANIFEST, REPORT, SIGNATURE})
"""Files the manifest does not hash: itself, the report with its build timestamps, and the signature
over the manifest (signing.py) that an unpacked signed archive brings."""

# Order of the engine graph's inputs after the weights; the runtime builds them in this order.
GRAPH_INPUTS = (
    "input_ids",  # [T] int64: the step's tokens, all sequences packed back to back
    "positions",  # [T] int64: position of each token in its sequence
    "slot_mapping",  # [T] int64: KV-cache slot (block * block_size + offset) each token writes
    "block_tables",  # [B, max_blocks_per_seq] int32: cache blocks of each sequence
    "seq_lens",  # [B] int32: tokens in the cache of each sequence after this step
    "cu_seqlens_q",  # [B + 1] int32: start of each sequence's tokens in the packed step
    "logits_indices",  # [N] int64: packed positions whose logits the step returns
    "lora_slots",  # [T] int32: adapter slot of each token (0: none)
    "kv_caches",  # list of 2 * num_layers tensors [num_blocks, num_kv_heads, block_size, head_dim]
)

LEGACY_GRAPH_INPUTS = tuple(n for n in GRAPH_INPUTS if n != "lora_slots")
"""The inputs of graphs built before LoRA slots (llmbuild 0.1.0 engines whose manifest names none)."""


def rank_dir(rank: int) -> str:
    return f"rank{rank}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Target(_Frozen):
    """Where an engine runs. The runtime refuses an engine whose target differs from the machine."""

    device: Literal["cpu", "cuda"]
    machine: str
    """CPU architecture (platform.machine()) the engine was built on, e.g. x86_64."""
    arch: str | None = None
    """GPU architecture, e.g. sm_90; None for cpu."""
    cuda_version: str | None = None
    """CUDA version of the torch build the engine was compiled with (torch.version.cuda); None for cpu."""
    cpu: str = "native"
    """The recipe's target.cpu: the -march its op library and compiled package were built with."""
    cpu_resolved: str = "native"
    """What target.cpu meant on the build machine (the CPU name the compiler picked for `native`)."""
    required_isa: tuple[str, ...] = ()
    """CPU instruction-set extensions the engine's code may use (/proc/cpuinfo names)."""
    kernel_isa: Literal["avx512", "avx2", "portable"] = "portable"
    """The best kernel tier of the engine's op library (plugins/csrc/isa.h)."""
    tensor_parallel: int = Field(1, ge=1)
    backend: Literal["eager", "compiled"]


class Inputs(_Frozen):
    """Hashes of what the engine was built from."""

    recipe_sha256: str
    checkpoint_sha256: str
    checkpoint_files: dict[str, str]
    calibration_sha256: str | None = None
    """Hash of the calibration text of an awq / gptq build."""


class Manifest(_Frozen):
    """Everything needed to load, check and serve an engine (format v1)."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str
    llmbuild_version: str
    torch_version: str
    target: Target
    model: ModelConfig
    dtype: Literal["float32", "float16", "bfloat16"]
    kv_cache_dtype: Literal["float32", "float16", "bfloat16", "int8", "fp8"]
    limits: EngineLimits
    kv_cache: KVCacheSection
    quantization: QuantizationSection
    plugins: dict[str, int]
    """Custom op name -> version the graph was built against."""
    serve: ServeSection
    cuda_graphs: CudaGraphsSection = CudaGraphsSection()
    """Decode batch sizes the runtime captures as CUDA graphs at load (cuda engines)."""
    speculative: SpeculativeSection | None = None
    """Speculative decoding the runtime does by default (None: none)."""
    lora: LoraSection | None = None
    """LoRA adapter slots in the graph (None: none)."""
    graph_inputs: tuple[str, ...] = LEGACY_GRAPH_INPUTS
    """The graph's inputs in order (GRAPH_INPUTS when it was built; the runtime refuses any other)."""
    config_hash: str
    """Hash of every field that changes the built artifact (the build-cache key, with the input hashes)."""
    inputs: Inputs
    files: dict[str, str]
    """Relative path -> sha256 of every file in the engine except manifest.json and report.json."""

    def save(self, engine_dir: Path) -> None:
        (engine_dir / MANIFEST).write_text(self.model_dump_json(indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, engine_dir: Path) -> Manifest:
        """Read and validate manifest.json, with a one-line error for a missing or foreign file."""
        path = engine_dir / MANIFEST
        if not engine_dir.is_dir():
            raise EngineError(f"engine directory not found: {engine_dir}")
        if not path.is_file():
            raise EngineError(f"{engine_dir} is not an llmbuild engine: {MANIFEST} is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineError(f"{path}: corrupt manifest ({exc})") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise EngineError(
                f"{path}: engine format version {version!r} is not supported (this llmbuild reads "
                f"version {FORMAT_VERSION}); rebuild the engine with this llmbuild"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            key = ".".join(str(p) for p in first["loc"])
            raise EngineError(f"{path}: invalid manifest: {key}: {first['msg']}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: object) -> str:
    """sha256 of a canonical JSON encoding (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_tree(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under root, keyed by its POSIX path relative to root, sorted."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {rel: sha256_file(p) for p in files if (rel := p.relative_to(root).as_posix()) not in skip}


def verify_files(engine_dir: Path, manifest: Manifest, only: tuple[str, ...] | None = None) -> None:
    """Re-hash the engine's files against the manifest; raise naming the first file that differs.

    `only` restricts the check to paths under those prefixes (a rank loads only its own files).
    """
    wanted = {
        rel: digest
        for rel, digest in manifest.files.items()
        if only is None or any(rel == p or rel.startswith(p + "/") for p in only)
    }
    for rel, digest in wanted.items():
        path = engine_dir / rel
        if not path.is_file():
            raise EngineError(f"{engine_dir}: file {rel} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise EngineError(
                f"{engine_dir}: file {rel} does not match its sha256 in the manifest "
                "(modified or corrupt); rebuild the engine"
            )
    if only is None:
        extra = sorted(set(hash_tree_names(engine_dir)) - set(manifest.files) - UNSEALED)
        if extra:
            raise EngineError(f"{engine_dir}: unexpected file {extra[0]} not listed in the manifest")


def hash_tree_names(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

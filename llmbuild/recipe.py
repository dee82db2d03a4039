"""Recipe schema: what to build, for which target, under which limits.

A recipe is YAML validated into frozen pydantic models. Every setting has a docstring (its description
in `Recipe.model_json_schema()`), unknown keys are errors, and every error names its key path:
`quantization.group_size: must be one of 32, 64, 128 (got 100)`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from llmbuild.cpu_target import check_name
from llmbuild.errors import RecipeError

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
GROUP_SIZES = (32, 64, 128)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelSection(_Section):
    checkpoint: str
    """Hugging Face checkpoint directory (config.json + safetensors + tokenizer), relative to the recipe file."""
    dtype: Dtype = "auto"
    """Dtype of the engine's weights and activations; `auto` keeps the checkpoint's dtype."""


class TargetSection(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    """Device the engine runs on."""
    arch: str = "auto"
    """GPU architecture (`sm_80`, `sm_89`, `sm_90`) or `auto` (the build machine's); `auto` on CPU."""
    tensor_parallel: int = Field(1, ge=1, le=64)
    """Number of ranks the model is split across (one engine per rank)."""
    backend: Literal["eager", "compiled"] = "compiled"
    """`compiled` runs an AOTInductor package built for `cpu`; `eager` runs the exported graph op by op
    (for debugging)."""
    cpu: str = "native"
    """CPU the engine's code is compiled for (its op library and AOTInductor package): `native` (the build
    machine's CPU), `x86-64-v3` (AVX2 + FMA + F16C: every x86-64 CPU since 2015), `x86-64-v4` (AVX-512) or a
    gcc `-march` CPU name (`haswell`, `znver4`, `sapphirerapids`). The runtime refuses a CPU that lacks any
    of its instructions."""

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        return check_name(v)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if v != "auto" and not (v.startswith("sm_") and v[3:].isdigit()):
            raise ValueError(f"must be 'auto' or a GPU architecture like sm_90 (got {v!r})")
        return v


class LimitsSection(_Section):
    max_batch_size: int = Field(8, ge=1, le=4096)
    """Most sequences in one step (decoding or prefilling together)."""
    max_seq_len: int | None = Field(None, ge=8)
    """Most tokens of one sequence, prompt and generated tokens together. Unset: the model's
    max_position_embeddings, at most 4096 (builder/plan.py resolves it; the engine records the value)."""
    max_num_tokens: int = Field(2048, ge=1)
    """Most tokens processed in one step (the prefill chunk budget, decodes included)."""

    @model_validator(mode="after")
    def _tokens_cover_batch(self) -> LimitsSection:
        if self.max_num_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_tokens ({self.max_num_tokens}) must be >= max_batch_size ({self.max_batch_size}): "
                "every running sequence needs one token per decode step"
            )
        return self


class EngineLimits(LimitsSection):
    """Limits resolved against the checkpoint (builder/plan.py): what a plan and a manifest hold."""

    max_seq_len: int = Field(ge=8)
    """Most tokens of one sequence, prompt and generated tokens together."""


class CalibrationSection(_Section):
    dataset: str = "builtin"
    """Calibration text: `builtin` (a public-domain text shipped with llmbuild) or a .txt/.jsonl path."""
    num_samples: int = Field(128, ge=1)
    """Number of calibration sequences."""
    seq_len: int = Field(512, ge=16)
    """Tokens per calibration sequence."""
    seed: int = 0
    """Seed for sampling calibration sequences (results are deterministic for a seed)."""


class QuantizationSection(_Section):
    weights: Literal["none", "int8", "int4", "fp8"] = "none"
    """Weight format: `none` keeps model.dtype; int8 per-channel, int4 grouped, fp8 e4m3 (GPU only)."""
    activations: Literal["none", "int8"] = "none"
    """Activation format of the quantized projections: `none` keeps model.dtype; int8 quantizes each token's
    input inside the op (one scale per token) for int8 x int8 products with int32 sums (W8A8; weights int8)."""
    method: Literal["rtn", "awq", "gptq", "smoothquant"] = "rtn"
    """Quantization algorithm: round-to-nearest, activation-aware scaling, Hessian-based GPTQ, or SmoothQuant
    (activations int8: activation outliers moved into the weights by per-channel factors)."""
    smoothquant_alpha: float = Field(0.5, gt=0, lt=1)
    """SmoothQuant migration strength: factors max|x| ** alpha / max|w| ** (1 - alpha); higher moves more of
    the activations' range into the weights."""
    group_size: int = 128
    """Columns sharing one scale in int4 (32, 64 or 128)."""
    fp8_scales: Literal["channel", "tensor"] = "channel"
    """fp8 weights: one scale per output row (`channel`) or one per matrix (`tensor`)."""
    kv_cache: Literal["auto", "int8", "fp8"] = "auto"
    """KV-cache dtype: `auto` = model dtype; int8, or fp8 e4m3 (GPU only), with per-kv-head scales
    calibrated on the calibration text."""
    exclude: tuple[str, ...] = ("lm_head",)
    """Weight name patterns (fnmatch) kept in model.dtype."""
    calibration: CalibrationSection | None = None
    """Calibration data for awq / gptq weights and int8 / fp8 KV-cache scales."""

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, GROUP_SIZES))} (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantizationSection:
        if self.weights == "none" and self.method != "rtn":
            raise ValueError(f"method={self.method} needs weights int8, int4 or fp8 (weights is none)")
        self._check_activations()
        if self.calibration is not None and not self.calibrated:
            raise ValueError(
                "calibration is used by method awq, gptq or smoothquant and by kv_cache int8 or fp8 (here: method "
                f"rtn, kv_cache {self.kv_cache}): remove it, or change method or kv_cache"
            )
        if self.fp8_scales != "channel" and self.weights != "fp8":
            raise ValueError(f"fp8_scales={self.fp8_scales} applies to fp8 weights (weights is {self.weights})")
        if self.weights == "fp8" and self.method != "rtn":
            raise ValueError(f"method={self.method} applies to int8 and int4 weights; fp8 weights use method rtn")
        return self

    def _check_activations(self) -> None:
        """int8 activations (W8A8) pair with int8 weights and round to nearest or SmoothQuant only."""
        if self.activations == "int8" and self.weights != "int8":
            raise ValueError(
                f"activations=int8 needs weights int8 (weights is {self.weights}): set quantization.weights: int8"
            )
        if self.activations == "int8" and self.method not in ("rtn", "smoothquant"):
            raise ValueError(
                f"activations=int8 takes method smoothquant or rtn (no smoothing), not {self.method}: "
                "set quantization.method: smoothquant"
            )
        if self.method == "smoothquant" and self.activations != "int8":
            raise ValueError(
                "method=smoothquant smooths int8 activations (activations is none): set quantization.activations: "
                "int8, or choose method rtn, awq or gptq"
            )
        if self.smoothquant_alpha != 0.5 and self.method != "smoothquant":
            raise ValueError(
                f"smoothquant_alpha={self.smoothquant_alpha:g} applies to method smoothquant (method is "
                f"{self.method}): remove it or set quantization.method: smoothquant"
            )

    @property
    def calibrated(self) -> bool:
        """Whether the build runs calibration text through the model (awq / gptq / smoothquant weights,
        KV-cache scales)."""
        return (self.weights != "none" and self.method != "rtn") or self.kv_cache in ("int8", "fp8")

    @property
    def quantized(self) -> bool:
        """Whether weights or the KV cache leave the model dtype (the quality gate applies)."""
        return self.weights != "none" or self.kv_cache != "auto"

    def calibration_or_default(self) -> CalibrationSection:
        """The calibration section in use: the recipe's, or the built-in text with defaults."""
        return self.calibration or CalibrationSection()


class QualitySection(_Section):
    max_kl: float | None = Field(None, gt=0)
    """Fail the build when the quantized engine's mean KL divergence to the unquantized one exceeds this."""
    min_top1: float | None = Field(None, gt=0, le=1)
    """Fail the build when next-token top-1 agreement with the unquantized engine falls below this."""


class KVCacheSection(_Section):
    block_size: Literal[8, 16, 32, 64, 128] = 16
    """Tokens per KV-cache block."""
    memory_fraction: float | None = Field(None, gt=0, le=1)
    """Fraction of the memory available at load (after weights) given to the KV cache."""
    memory_bytes: ByteSize | None = Field(None, gt=0)
    """Exact KV-cache size, e.g. `2GiB`. Unset (and no fraction): room for max_batch_size full-length sequences."""

    @model_validator(mode="after")
    def _one_budget(self) -> KVCacheSection:
        if self.memory_fraction is not None and self.memory_bytes is not None:
            raise ValueError(
                f"set memory_fraction ({self.memory_fraction}) or memory_bytes ({int(self.memory_bytes)}), not both"
            )
        return self


class PluginsSection(_Section):
    gemv: bool = True
    """Decode-sized bf16 projections (<= 4 rows) through llmbuild's AVX512-BF16 kernel; larger ones use oneDNN."""
    fused_rms_norm: bool = False
    """Fused RMSNorm (+ residual add) kernel instead of separate ops."""
    fused_rope: bool = False
    """Fused rotary-embedding kernel."""
    fused_swiglu: bool = False
    """Fused SiLU-gate-multiply kernel."""


class CudaGraphsSection(_Section):
    enabled: bool = False
    """Capture decode steps as CUDA Graphs (cuda targets only)."""
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """Batch-size buckets captured; larger decode batches run without a graph."""

    @field_validator("batch_sizes")
    @classmethod
    def _sorted_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError("must be a non-empty list of positive integers")
        return tuple(sorted(set(v)))


class DraftSection(_Section):
    """The draft engine `llmbuild compile` builds with this one (speculative.method draft): a smaller or more
    quantized model with the target's tokenizer, built for the same target and limits."""

    checkpoint: str | None = None
    """The draft's Hugging Face checkpoint directory, relative to the recipe file. Unset: the target's own
    (self-speculation: then `quantization` must make it cheaper)."""
    quantization: QuantizationSection = QuantizationSection()
    """The draft's quantization (the keys of the top-level `quantization`), e.g. `{weights: int4}`."""


class SpeculativeSection(_Section):
    """Speculative decoding: several tokens proposed cheaply, then checked in one pass of the engine."""

    method: Literal["ngram", "draft"] = "ngram"
    """`ngram` (prompt lookup): the tokens that followed the latest earlier occurrence of the request's last
    n tokens (in its prompt or output) are proposed; no second model. `draft`: a second, smaller engine with
    the same tokenizer proposes its greedy tokens: the one `draft` builds into the engine, else the one given at
    run time (`--draft-engine`)."""
    num_speculative_tokens: int = Field(4, ge=1, le=16)
    """Most tokens proposed per sequence and step (at most 16: the CPU attention kernel checks the last token and
    up to 16 proposals exactly as it decodes, csrc/paged_attention.cpp kMaxQueryTokens)."""
    prompt_lookup_min: int = Field(1, ge=1)
    """ngram: the shortest suffix (in tokens) that is looked up."""
    prompt_lookup_max: int = Field(4, ge=1)
    """ngram: the longest suffix that is looked up (longer matches are tried first)."""
    max_batch_size: int = Field(4, ge=1)
    """Speculate only in steps with at most this many decoding sequences (above it the step is compute-bound
    and checking proposals costs more than it saves)."""
    adaptive: bool = True
    """Let sequences propose only while steps with proposals have measured faster (tokens per second) than
    steps without, per number of decoding sequences (one step in 64 tries the other kind); false: propose
    whenever a sequence finds a match."""
    min_acceptance_rate: float = Field(0.0, ge=0, le=1)
    """A sequence whose running share of accepted proposals falls below this stops speculating for 32 tokens,
    then tries again; 0 (default): never, the measured speeds decide (`adaptive`). Prompt lookup's acceptance
    comes in streaks (rejections, then a passage or loop that is accepted whole): on the demo model pausing at
    0.1-0.3 skipped the streaks that pay, 0.96x of speculation off against 1.17x without the pause
    (bench/results/spec-demo.md)."""
    draft: DraftSection | None = None
    """method draft: a draft engine built with this one, into its `draft/` directory (absent: the runtime
    needs `--draft-engine PATH`)."""

    @model_validator(mode="after")
    def _lookup_range(self) -> SpeculativeSection:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max ({self.prompt_lookup_max})"
            )
        if self.draft is not None and self.method != "draft":
            raise ValueError(
                f"draft (a draft engine built with this one) needs method draft (method is {self.method}): set "
                "speculative.method: draft or remove speculative.draft"
            )
        return self


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections a LoRA adapter may target, by their Hugging Face (PEFT) names."""


class LoraSection(_Section):
    """Adapter slots compiled into the engine: LoRA adapters (PEFT format) are loaded into them at run time."""

    max_loras: int = Field(4, ge=1, le=256)
    """Distinct adapters one step can run (slot 0, no adapter, comes on top); more may be registered, they
    take turns in the slots."""
    max_rank: int = Field(16, ge=1, le=512)
    """The highest adapter rank a slot holds; a lower-rank adapter computes at its own rank."""
    target_modules: tuple[str, ...] = LORA_MODULES
    """The projections that carry slots (PEFT names); an adapter may target a subset of them."""

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in LORA_MODULES]
        if unknown:
            raise ValueError(f"unknown module {unknown[0]!r}: target_modules are among {', '.join(LORA_MODULES)}")
        if not v:
            raise ValueError(f"must name at least one of {', '.join(LORA_MODULES)}")
        return tuple(m for m in LORA_MODULES if m in v)


class ServeSection(_Section):
    host: str = "127.0.0.1"
    """Address `llmbuild serve` binds by default (loopback: nothing outside the machine can reach it)."""
    port: int = Field(8000, ge=1, le=65535)
    """Port `llmbuild serve` listens on by default."""
    max_tokens: int = Field(256, ge=1)
    """Default max_tokens for requests that do not set it."""
    temperature: float = Field(1.0, ge=0)
    """Default sampling temperature (0 = greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Default nucleus-sampling mass."""
    top_k: int = Field(0, ge=0)
    """Default top-k (0 = off)."""


class Recipe(_Section):
    """A complete build recipe; `load_recipe` validates YAML into it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    """Engine name (letters, digits, `.`, `_`, `-`)."""
    model: ModelSection
    target: TargetSection = TargetSection()
    limits: LimitsSection = LimitsSection()
    quantization: QuantizationSection = QuantizationSection()
    quality: QualitySection = QualitySection()
    kv_cache: KVCacheSection = KVCacheSection()
    plugins: PluginsSection = PluginsSection()
    cuda_graphs: CudaGraphsSection = CudaGraphsSection()
    speculative: SpeculativeSection | None = None
    """Speculative decoding (absent: none); the runtime may switch it off (`--no-speculative`)."""
    lora: LoraSection | None = None
    """LoRA adapter slots (absent: the engine serves its base weights only)."""
    serve: ServeSection = ServeSection()

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _cross_sections(self) -> Recipe:
        if self.cuda_graphs.enabled and self.target.device != "cuda":
            raise ValueError("cuda_graphs.enabled needs target.device=cuda (it is cpu)")
        if self.target.device == "cpu" and self.target.arch != "auto":
            raise ValueError(f"target.arch={self.target.arch} is a GPU architecture but target.device is cpu")
        for key, q in self._quantization_sections() if self.target.device == "cpu" else []:
            if q.weights == "fp8":
                raise ValueError(
                    f"{key}.weights=fp8 needs a GPU target (fp8 GEMM runs on sm_89/sm_90); use int8 or int4 on cpu"
                )
            if q.kv_cache == "fp8":
                raise ValueError(f"{key}.kv_cache=fp8 needs a GPU target (target.device: cuda); use int8 on cpu")
        return self

    def _quantization_sections(self) -> list[tuple[str, QuantizationSection]]:
        """The engine's quantization and its built-in draft's, by key path."""
        sections = [("quantization", self.quantization)]
        if self.speculative is not None and self.speculative.draft is not None:
            sections.append(("speculative.draft.quantization", self.speculative.draft.quantization))
        return sections

    def base_dir(self) -> Path:
        """The directory relative paths in the recipe are resolved against (the recipe file's)."""
        return self._base_dir

    def checkpoint_dir(self) -> Path:
        """The checkpoint directory, resolved against the recipe file's directory."""
        return (self._base_dir / self.model.checkpoint).resolve()

    def to_yaml(self) -> str:
        """The fully resolved recipe (defaults filled in) as YAML, keys in schema order."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_recipe(data: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate already-parsed YAML data; errors name the key path and the fix."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc, Recipe)}") from None
    recipe._base_dir = (base_dir or Path.cwd()).resolve()
    return recipe


def load_recipe(path: str | Path, target_cpu: str | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe YAML file; `overrides` (`KEY=VALUE`, see apply_overrides), then
    `target_cpu`, replace its values before validation."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides)
    if target_cpu is not None and isinstance(data, dict):
        data["target"] = {**(data.get("target") or {}), "cpu": target_cpu}
    source = f"{path} with --set" if overrides else str(path)
    return parse_recipe(data, source=source, base_dir=path.parent)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of a recipe's parsed YAML with each `KEY=VALUE` of `overrides` set, in order.

    KEY is a dotted key path (`quantization.weights`); VALUE is parsed as a YAML scalar or flow value
    (`int4`, `512`, `true`, `[lm_head, "layers.0.*"]`, empty for null). The result is validated like
    the file itself, so an unknown key or a bad value is an error naming its dotted key.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. quantization.weights=int4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(f"--set {key}: invalid YAML value {text!r}: {problem}") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                section = ".".join(parts[: depth + 1])
                raise RecipeError(f"--set {key}: {section} is a value ({node[part]!r}), not a section of keys")
            node = node[part]
        node[parts[-1]] = value
    return out


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """One line per pydantic error (joined by '; '), each prefixed with its dotted key path."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key{_known_keys_hint(root, loc)}")
        elif err["type"] == "missing":
            parts.append(f"{key}: required key is missing")
        elif err["type"] == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            parts.append(f"{key}: must be one of {allowed.replace(' or ', ', ')} (got {err['input']!r})")
        elif err["type"] in _BOUNDS:
            bound = next(iter(err.get("ctx", {}).values()), "?")
            parts.append(f"{key}: must be {_BOUNDS[err['type']]} {bound} (got {err['input']!r})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            msg = msg.replace("Input should be ", "must be ").replace("String should ", "must ")
            got = f" (got {err['input']!r})" if _scalar(err.get("input")) and "got" not in msg else ""
            parts.append(f"{key}: {msg}{got}")
    return "; ".join(parts)


_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
    "too_long": "at most",
    "too_short": "at least",
}


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) and not isinstance(v, dict)


def _known_keys_hint(root: type[BaseModel], loc: list[str]) -> str:
    """' (did you mean X?; valid keys: ...)' for the section that holds the unknown key."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return ""
        model = candidates[0]
    keys = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], keys, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f" ({hint}valid keys: {', '.join(keys)})"

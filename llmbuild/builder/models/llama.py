"""The Llama family graph: Llama (incl. llama3 RoPE scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (QK-norm).

One forward runs one packed step (prefill, chunked prefill and decode together; see
plugins/paged_attention.py for the metadata). Projections are fused at load: q/k/v into one
`qkv` matrix and gate/up into one `gate_up` matrix, so a layer runs four GEMMs.
Numerics follow Hugging Face transformers (the test oracle): RMSNorm in fp32 cast back before
the weight multiply, RoPE tables in fp32 cast to the activation dtype, logits returned in fp32.
Norms, RoPE and SwiGLU run as fused plugin ops or as their torch references (recipe `plugins`);
both round where transformers does.
A tensor-parallel rank's graph is the same model at its rank's shapes (tensor_parallel.rank_config)
with an all-reduce after each row-parallel projection (o, down).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmbuild.builder.models.lora_slots import LoraSlots
from llmbuild.errors import CheckpointError
from llmbuild.model_config import ModelConfig, RopeConfig
from llmbuild.plugins.rms_norm import add_rms_norm_ref, rms_norm_ref
from llmbuild.plugins.rope import rope_ref
from llmbuild.plugins.swiglu import swiglu_ref
from llmbuild.recipe import PluginsSection
from llmbuild.tensor_parallel import GROUP_NAME


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling == "llama3":
        assert rope.original_max_position_embeddings is not None  # RopeConfig checks it
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / rope.low_freq_factor, old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(rope: RopeConfig, head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_len, head_dim] in fp32 (halves duplicated, as rotate_half expects)."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(rope, head_dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def project_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemv: bool) -> torch.Tensor:
    """x @ weight.T + bias through the linear plugin (decode-sized bf16 kernel) or aten."""
    if gemv:
        return torch.ops.llmbuild.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def all_reduce(x: torch.Tensor, tp: int) -> torch.Tensor:
    """The sum of x over the tensor-parallel ranks (identity for one rank), as c10d ops in the graph."""
    if tp == 1:
        return x
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", GROUP_NAME))


class Linear(nn.Linear):
    """A projection in the model dtype, through the linear plugin or aten (recipe `plugins.gemv`).

    Quantization replaces these modules by quantized ones with the same call (builder/quantize.py).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, plugins: PluginsSection) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.gemv = plugins.gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project_weight(x, self.weight, self.bias, self.gemv)


class RMSNorm(nn.Module):
    """RMSNorm through the fused plugin or plain ops; `add` fuses the residual add that precedes it."""

    def __init__(self, dim: int, eps: float, plugins: PluginsSection) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.fused = plugins.fused_rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.llmbuild.rms_norm(x, self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        if self.fused:
            return torch.ops.llmbuild.add_rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm_ref(x, residual, self.weight, self.eps)


def with_lora(
    lora: LoraSlots | None, x: torch.Tensor, y: torch.Tensor, lora_slots: torch.Tensor | None
) -> torch.Tensor:
    """y plus the step's adapters' share of the projection of x (y as it is without adapter slots, or
    when the caller runs a layer on its own with no slots given: the builder's calibration passes)."""
    return y if lora is None or lora_slots is None else lora(x, y, lora_slots)


class Attention(nn.Module):
    kv_scales: torch.Tensor | None  # [2, H_kv] fp32 K and V head scales of an int8 KV cache (builder/kv_quant.py)
    qkv_lora: LoraSlots | None  # adapter slots (builder/models/lora_slots.py), None without a recipe `lora`
    o_lora: LoraSlots | None

    def __init__(self, cfg: ModelConfig, plugins: PluginsSection, tp: int) -> None:
        super().__init__()
        self.plugins = plugins
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q, kv, kv)
        self.qkv = Linear(cfg.hidden_size, q + 2 * kv, cfg.qkv_bias, plugins)
        self.o = Linear(q, cfg.hidden_size, cfg.o_bias, plugins)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, plugins) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, plugins) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.register_buffer("kv_scales", None)
        self.qkv_lora = self.o_lora = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # positions [T], cos and sin tables [L, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: tuple[torch.Tensor, ...],
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = with_lora(self.qkv_lora, x, self.qkv(x), lora_slots).split(self.split, dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope_fn = torch.ops.llmbuild.rope if self.plugins.fused_rope else rope_ref
        q, k = rope_fn(q, *rope), rope_fn(k, *rope)
        if self.kv_scales is None:
            out = torch.ops.llmbuild.paged_attention(q, k, v, k_cache, v_cache, *meta, self.scale)
        else:
            out = torch.ops.llmbuild.quantized_paged_attention(
                q, k, v, k_cache, v_cache, *meta, self.kv_scales, self.scale
            )
        out = out.reshape(t, self.num_heads * self.head_dim)
        return all_reduce(with_lora(self.o_lora, out, self.o(out), lora_slots), self.tp)


class MLP(nn.Module):
    gate_up_lora: LoraSlots | None
    down_lora: LoraSlots | None

    def __init__(self, cfg: ModelConfig, plugins: PluginsSection, tp: int) -> None:
        super().__init__()
        self.plugins = plugins
        self.tp = tp
        self.intermediate = cfg.intermediate_size
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, plugins)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, plugins)
        self.gate_up_lora = self.down_lora = None

    def forward(self, x: torch.Tensor, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        gate_up = with_lora(self.gate_up_lora, x, self.gate_up(x), lora_slots)
        act = torch.ops.llmbuild.swiglu(gate_up) if self.plugins.fused_swiglu else swiglu_ref(gate_up)
        return all_reduce(with_lora(self.down_lora, act, self.down(act), lora_slots), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plugins: PluginsSection, tp: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plugins)
        self.attn = Attention(cfg, plugins, tp)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plugins)
        self.mlp = MLP(cfg, plugins, tp)

    def forward(self, h, residual, rope, k_cache, v_cache, meta, lora_slots=None):
        """Residual-stream form: returns (this layer's output, the stream before it), so that every
        residual add fuses into the norm that follows it (the same sums as h = h + f(norm(h)))."""
        if residual is None:
            x, residual = self.attn_norm(h), h
        else:
            x, residual = self.attn_norm.add(h, residual)
        h = self.attn(x, rope, k_cache, v_cache, meta, lora_slots)
        x, residual = self.mlp_norm.add(h, residual)
        return self.mlp(x, lora_slots), residual


class LlamaModel(nn.Module):
    """Decoder-only transformer over a packed step; returns fp32 logits of the selected rows.

    With tp > 1, `cfg` is one rank's share (tensor_parallel.rank_config) and the graph all-reduces.
    """

    rope_cos: torch.Tensor  # [max_seq_len, head_dim] fp32
    rope_sin: torch.Tensor
    kv_codes: torch.dtype = torch.int8  # the KV cache's dtype once the layers carry KV scales (builder/kv_quant.py)

    def __init__(self, cfg: ModelConfig, max_seq_len: int, plugins: PluginsSection, tp: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.plugins = plugins
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, plugins, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plugins)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, plugins)
        self.max_seq_len = max_seq_len
        self.register_buffer("rope_cos", torch.empty(max_seq_len, cfg.head_dim))
        self.register_buffer("rope_sin", torch.empty(max_seq_len, cfg.head_dim))
        self.requires_grad_(False)

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        max_seq_len: int,
        dtype: torch.dtype,
        plugins: PluginsSection | None = None,
        tp: int = 1,
    ) -> LlamaModel:
        """Allocate (uninitialised) weights in `dtype` without a throwaway init; RoPE tables stay fp32."""
        with torch.device("meta"):
            model = cls(cfg, max_seq_len, plugins or PluginsSection(), tp)
        model = model.to(dtype).to_empty(device="cpu")
        model.rope_cos, model.rope_sin = rope_tables(cfg.rope, cfg.head_dim, max_seq_len)
        return model

    def kv_cache_dtype(self) -> torch.dtype:
        """The quantized codes (`kv_codes`) when the attention layers carry KV scales, else the model dtype."""
        attn = self.layers[0].get_submodule("attn")
        assert isinstance(attn, Attention)
        return self.kv_codes if attn.kv_scales is not None else self.embed.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        slot_mapping: torch.Tensor,  # [T]
        block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
        seq_lens: torch.Tensor,  # [B]
        cu_seqlens_q: torch.Tensor,  # [B + 1]
        logits_indices: torch.Tensor,  # [N]
        lora_slots: torch.Tensor,  # [T] int32: each token's adapter slot (0: none; unused without slots)
        kv_caches: list[torch.Tensor],  # 2 * num_layers x [num_blocks, H_kv, block_size, D]
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        rope = (positions, self.rope_cos, self.rope_sin)
        meta = (slot_mapping, block_tables, seq_lens, cu_seqlens_q)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, kv_caches[2 * i], kv_caches[2 * i + 1], meta, lora_slots)
        assert residual is not None  # num_layers >= 1
        h, _ = self.norm.add(h[logits_indices], residual[logits_indices])
        if self.lm_head is None:  # tied to the embedding
            return project_weight(h, self.embed.weight, None, self.plugins.gemv).float()  # [N, vocab]
        return self.lm_head(h).float()


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every projection, by module name (what quantization.exclude matches)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {}
    for i in range(cfg.num_layers):
        shapes[f"layers.{i}.attn.qkv"] = (q + 2 * kv, cfg.hidden_size)
        shapes[f"layers.{i}.attn.o"] = (cfg.hidden_size, q)
        shapes[f"layers.{i}.mlp.gate_up"] = (2 * cfg.intermediate_size, cfg.hidden_size)
        shapes[f"layers.{i}.mlp.down"] = (cfg.hidden_size, cfg.intermediate_size)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def prefill_metadata(
    num_seqs: int, seq_len: int, block_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """(positions, attention metadata, KV blocks needed) for one step prefilling num_seqs whole sequences.

    Sequence b owns blocks b*n .. b*n + n - 1 (n = blocks per sequence); the metadata tuple is
    (slot_mapping, block_tables, seq_lens, cu_seqlens_q), as LlamaModel.forward takes them, on `device`.
    """
    per_seq = math.ceil(seq_len / block_size)
    positions = torch.arange(seq_len).repeat(num_seqs)
    slot_mapping = (torch.arange(num_seqs)[:, None] * per_seq * block_size + torch.arange(seq_len)).flatten()
    block_tables = torch.arange(num_seqs * per_seq, dtype=torch.int32).reshape(num_seqs, per_seq)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32)
    cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32) * seq_len
    meta = tuple(t.to(device) for t in (slot_mapping, block_tables, seq_lens, cu_seqlens_q))
    return positions.to(device), meta, num_seqs * per_seq


def hf_weight_target(cfg: ModelConfig, name: str) -> tuple[str, int, int] | None:
    """Map a Hugging Face tensor name to (our parameter, first row, rows); None for tensors to skip.

    q/k/v land in row ranges of `qkv`, gate/up in row ranges of `gate_up`.
    """
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    if name.endswith("rotary_emb.inv_freq"):
        return None  # old checkpoints store the RoPE frequencies; we compute them
    if name == "model.embed_tokens.weight":
        return "embed.weight", 0, cfg.vocab_size
    if name == "model.norm.weight":
        return "norm.weight", 0, cfg.hidden_size
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else ("lm_head.weight", 0, cfg.vocab_size)
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (not a {cfg.architecture} weight)")
    layer, module, suffix = f"layers.{parts[2]}", ".".join(parts[3:-1]), parts[-1]
    fused = {
        "self_attn.q_proj": ("attn.qkv", 0, q),
        "self_attn.k_proj": ("attn.qkv", q, kv),
        "self_attn.v_proj": ("attn.qkv", q + kv, kv),
        "self_attn.o_proj": ("attn.o", 0, cfg.hidden_size),
        "self_attn.q_norm": ("attn.q_norm", 0, cfg.head_dim),
        "self_attn.k_norm": ("attn.k_norm", 0, cfg.head_dim),
        "mlp.gate_proj": ("mlp.gate_up", 0, inter),
        "mlp.up_proj": ("mlp.gate_up", inter, inter),
        "mlp.down_proj": ("mlp.down", 0, cfg.hidden_size),
        "input_layernorm": ("attn_norm", 0, cfg.hidden_size),
        "post_attention_layernorm": ("mlp_norm", 0, cfg.hidden_size),
    }
    if module not in fused or suffix not in ("weight", "bias"):
        raise CheckpointError(f"unexpected tensor {name!r} in checkpoint (not a {cfg.architecture} weight)")
    target, first, rows = fused[module]
    return f"{layer}.{target}.{suffix}", first, rows

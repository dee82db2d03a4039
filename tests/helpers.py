"""Helpers shared by several test files (pytest fixtures live in the conftest.py files instead).

Grouped by topic: device, command line, model configs, prompts and engines, tensor-parallel workers,
quantized engines, paged attention cases.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llmbuild.builder.models.llama import LlamaModel
from llmbuild.cli import main
from llmbuild.model_config import ModelConfig, RopeConfig
from llmbuild.plugins.paged_attention import CODE_MAX, quantize_kv
from llmbuild.recipe import LimitsSection, PluginsSection
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams
from tests.builder.quantization_fixtures import DEMO

# --- device: where the Triton kernels run (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) ---

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# --- command line ---


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `llmbuild` with `args` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# --- model configs and tiny models ---


def config(heads: int = 8, kv_heads: int = 2, intermediate: int = 512) -> ModelConfig:
    """A small Llama config with the given head counts and MLP width, for tensor-parallel splits."""
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=intermediate,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=512,
    )


CFG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=10000.0),
    max_position_embeddings=64,
)
LIMITS = LimitsSection(max_batch_size=4, max_seq_len=32, max_num_tokens=32)
FUSED = PluginsSection(gemv=True, fused_rms_norm=True, fused_rope=True, fused_swiglu=True)


def tiny_model() -> LlamaModel:
    """A randomly initialised fp32 model of CFG with every fused plugin on (seeded: the same each call)."""
    model = LlamaModel.empty(CFG, LIMITS.max_seq_len, torch.float32, FUSED)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.data = (
            1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.2 * torch.randn(p.shape, generator=g)
        )
    return model


class SmallConstants(torch.nn.Module):
    """A linear with weights of the sizes Inductor inlines into its code unless told not to: a 0-d tensor,
    a 1-D tensor of one value (an fp8 per-tensor scale) and one of 8 (a bias of 8 outputs)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(16, 8, generator=g), requires_grad=False)
        self.register_buffer("scale", torch.rand(1, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(8, generator=g))
        self.register_buffer("shift", torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight) * self.scale + self.bias + self.shift


# --- prompts and engine runs ---

GREEDY = dict(temperature=0.0, ignore_eos=True)

PERSON = {  # a JSON schema a random tiny model completes within ~120 tokens
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def random_prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    """`n` token ids drawn from [3, vocab) with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def grounded_prompts(tokenizer) -> list[list[int]]:
    """Passages of the demo's held-out text, then their first words again, of lengths around block edges."""
    passages = (DEMO / "validation.txt").read_text().split("\n\n")
    prompts = []
    for n, passage in zip((5, 14, 15, 16, 33), passages, strict=False):
        ids = tokenizer.encode(passage)[:n]
        prompts.append(ids + tokenizer.encode("\n\n") + ids[: n // 2])
    return prompts


def teacher_forced_logits(llm: LLMEngine, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Engine logits for every prompt position (one prefill step), then one decode step per forced token."""
    # row i predicts the token after position i of prompt + forced
    request = llm.make_request(prompt, SamplingParams(max_tokens=len(forced) + 1, **GREEDY))
    llm.add_request(request)
    batch = llm.scheduler.schedule()
    assert batch.num_tokens == len(prompt)
    inputs, _ = llm.runner.prepare(batch)
    rows = [llm.runner.run(dataclasses.replace(inputs, logits_indices=torch.arange(len(prompt))))]
    llm.scheduler.update(batch, [forced[0]])
    for token in forced[1:] + [0]:
        batch = llm.scheduler.schedule()
        assert batch.num_tokens == 1
        rows.append(llm.runner.execute(batch))
        llm.scheduler.update(batch, [token])
    llm.abort(request)
    return torch.cat(rows)


def generate(llm: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Each prompt's tokens, all run together (in-flight batched) with its own sampling parameters."""
    requests = [llm.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for request in requests:
        llm.add_request(request)
    while llm.has_unfinished():
        llm.step()
    return [list(r.output_token_ids) for r in requests]


# --- tensor-parallel workers ---


def worker_pids(parent: int | None = None) -> list[int]:
    """Live tensor-parallel workers started by process `parent` (default: this one)."""
    parent = parent or os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"llmbuild.runtime.rank_workers" in cmdline:
            pids.append(int(entry.name))
    return pids


# --- quantized engines ---


def first_token_agreement(engine_a: Path, engine_b: Path) -> float:
    """Share of 40 held-out prefixes on which both engines pick the same greedy next token."""
    # greedy continuations of a small model diverge at near-ties, so next-token choices are compared
    # teacher-forced rather than whole generations
    tok = AutoTokenizer.from_pretrained(DEMO)
    ids = tok((DEMO / "validation.txt").read_text())["input_ids"]
    prompts = [ids[i : i + 12] for i in range(0, 40 * 12, 12)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    a = [c.token_ids[0] for c in LLMEngine.from_dir(engine_a).generate(prompts, params)]
    b = [c.token_ids[0] for c in LLMEngine.from_dir(engine_b).generate(prompts, params)]
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(prompts)


# --- paged attention cases ---

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 16, 4, 32


def make_case(
    dtype, ctx_lens=(5, 20, 12), new_tokens=(5, 1, 3), seed=0, heads=(H, HKV), num_blocks=NUM_BLOCKS, head_dim=D
):
    """A packed step mixing a fresh prompt, a decode and a continued chunk, with scattered blocks."""
    # heads: the query and kv head counts
    h, hkv = heads
    D = head_dim
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, hkv, BS, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous block tables
    max_blocks = max(-(-length // BS) for length in ctx_lens) + 1
    tables, full_k, full_v, q_parts, k_new, v_new, slots = [], [], [], [], [], [], []
    for length, n in zip(ctx_lens, new_tokens, strict=True):
        blocks = [free.pop() for _ in range(-(-length // BS))]
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
        k = torch.randn(length, hkv, D, generator=g).to(dtype)
        v = torch.randn(length, hkv, D, generator=g).to(dtype)
        for p in range(length - n):  # the already-cached prefix
            k_cache[blocks[p // BS], :, p % BS] = k[p]
            v_cache[blocks[p // BS], :, p % BS] = v[p]
        full_k.append(k)
        full_v.append(v)
        q_parts.append(torch.randn(n, h, D, generator=g).to(dtype))
        k_new.append(k[length - n :])
        v_new.append(v[length - n :])
        slots += [blocks[p // BS] * BS + p % BS for p in range(length - n, length)]
    cu = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32)
    args = (
        torch.cat(q_parts),
        torch.cat(k_new),
        torch.cat(v_new),
        k_cache,
        v_cache,
        torch.tensor(slots),
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(ctx_lens, dtype=torch.int32),
        cu,
    )
    return args, full_k, full_v, q_parts


def quantized_case(dtype, codes=torch.int8, seed=0, **case):
    """make_case with int8 or fp8 caches: per-head scales from the absmax of the sequences' K and V."""
    args, full_k, full_v, q_parts = make_case(dtype, seed=seed, **case)
    k_all, v_all = torch.cat(full_k).float(), torch.cat(full_v).float()
    kv_scales = torch.stack([k_all.abs().amax(dim=(0, 2)), v_all.abs().amax(dim=(0, 2))]) / CODE_MAX[codes]
    caches = [
        quantize_kv(cache.transpose(1, 2), head_scales, codes).transpose(1, 2).contiguous()  # [blocks, bs, H_kv, D]
        for cache, head_scales in zip(args[3:5], kv_scales, strict=True)
    ]
    return (*args[:3], *caches, *args[5:]), kv_scales, full_k, full_v, q_parts


# --- LoRA adapters (made with peft, the format's reference) ---

ALL_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(checkpoint: Path, out: Path, seed: int, **config) -> torch.nn.Module:
    """Write a PEFT LoRA adapter of the checkpoint to `out` (random A and B: init_lora_weights=False) and
    return transformers' model with it merged (W + scale * B @ A), the oracle of adapter tests."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(out)
    return model.merge_and_unload().eval()


def greedy_tokens(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of a transformers model after `prompt` (no stop at EOS)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]

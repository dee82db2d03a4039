#!/usr/bin/env python3
"""What multi-LoRA costs at decode: an engine built with and without a `lora` section, and the LoRA engine
with 1 and 4 distinct adapters in the batch, side by side in one process, rounds interleaved.

    python bench/lora_cost.py [--base engines/tinyllama-bf16] [--lora engines/tinyllama-bf16-lora]
        [--batch 1 16] [--rounds 5] -> bench/results/lora-cost.{json,md}

Each configuration runs `batch` requests of a 64-token prompt, then times their 64 decode steps (prefill
excluded): decode tokens per second. Adapters are random PEFT adapters of rank 16 on all seven projections
(written once under --adapters; their values do not change the cost). An engine with an adapter merged into
its weights runs the base engine's graph at its shapes, so the base engine's row is the merged-weights
engine's speed too. Reported: best and median of the rounds, and each row's ratio to the base engine's
median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmbuild.lora_layout import PROJECTIONS  # noqa: E402
from llmbuild.machine import cpu_flags, cpu_model  # noqa: E402
from llmbuild.model_config import ModelConfig  # noqa: E402
from llmbuild.runtime.llm_engine import LLMEngine  # noqa: E402
from llmbuild.runtime.sampling_params import SamplingParams  # noqa: E402

PROMPT, NEW_TOKENS, RANK = 64, 64, 16
ISA = {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}


def write_adapter(cfg: ModelConfig, out: Path, seed: int) -> None:
    """A random rank-16 PEFT LoRA adapter on every projection of a model of `cfg`'s shape."""
    g = torch.Generator().manual_seed(seed)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {  # (out, in) of each PEFT module
        "self_attn.q_proj": (q, cfg.hidden_size),
        "self_attn.k_proj": (kv, cfg.hidden_size),
        "self_attn.v_proj": (kv, cfg.hidden_size),
        "self_attn.o_proj": (cfg.hidden_size, q),
        "mlp.gate_proj": (cfg.intermediate_size, cfg.hidden_size),
        "mlp.up_proj": (cfg.intermediate_size, cfg.hidden_size),
        "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size),
    }
    tensors = {}
    for i in range(cfg.num_layers):
        for module, (n, k) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, k, generator=g) / k**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n, RANK, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    modules = [m for names in PROJECTIONS.values() for m in names]
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": modules, "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config))


def decode_rate(llm: LLMEngine, batch: int, adapters: list[str | None], seed: int) -> float:
    """Decode tokens per second of `batch` requests (request i with adapters[i % len]) after their prefill."""
    g = torch.Generator().manual_seed(seed)
    vocab = llm.engine.manifest.model.vocab_size
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [
        llm.make_request(
            torch.randint(3, vocab, (PROMPT,), generator=g).tolist(), params, lora=adapters[i % len(adapters)]
        )
        for i in range(batch)
    ]
    for r in requests:
        llm.add_request(r)
    while any(not r.output_token_ids for r in requests):
        llm.step()
    done = sum(len(r.output_token_ids) for r in requests)
    start = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
    seconds = time.perf_counter() - start
    return (sum(len(r.output_token_ids) for r in requests) - done) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=ROOT / "engines" / "tinyllama-bf16")
    parser.add_argument("--lora", type=Path, default=ROOT / "engines" / "tinyllama-bf16-lora")
    parser.add_argument("--adapters", type=Path, default=ROOT / "engines" / "lora-adapters")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora-cost")
    args = parser.parse_args()
    base = LLMEngine.from_dir(args.base, enable_prefix_caching=False, speculative=False)
    lora = LLMEngine.from_dir(args.lora, enable_prefix_caching=False, speculative=False)
    assert lora.loras is not None, f"{args.lora} has no LoRA slots"
    cfg = lora.engine.manifest.model
    for i in range(4):
        path = args.adapters / f"r{RANK}-{i}"
        if not (path / "adapter_model.safetensors").is_file():
            write_adapter(cfg, path, seed=i)
        lora.loras.register(f"a{i}", path)
    configs = {
        "base engine (no lora section; = merged weights)": (base, [None]),
        "lora engine, no adapter": (lora, [None]),
        "lora engine, 1 adapter": (lora, ["a0"]),
        "lora engine, 4 adapters": (lora, ["a0", "a1", "a2", "a3"]),
    }
    rates: dict[tuple[int, str], list[float]] = {}
    for llm, adapters in configs.values():  # warm every shape once
        decode_rate(llm, max(args.batch), adapters, seed=99)
    for r in range(args.rounds):
        for b in args.batch:
            for name, (llm, adapters) in configs.items():
                if len(adapters) <= b:  # a batch of 1 cannot hold 4 adapters
                    rates.setdefault((b, name), []).append(decode_rate(llm, b, adapters, seed=r))
    rows = []
    for b in args.batch:
        reference = statistics.median(rates[(b, next(iter(configs)))])
        for name in configs:
            if (b, name) not in rates:
                continue
            got = rates[(b, name)]
            rows.append(
                {
                    "batch": b,
                    "config": name,
                    "tok_s_best": round(max(got), 1),
                    "tok_s_median": round(statistics.median(got), 1),
                    "vs_base_median": round(statistics.median(got) / reference, 3),
                }
            )
    report = {
        "base": str(args.base),
        "lora": str(args.lora),
        "lora_section": lora.engine.manifest.lora.model_dump() if lora.engine.manifest.lora else None,
        "cpu": cpu_model(),
        "cpu_flags": sorted(cpu_flags() & ISA),
        "threads": torch.get_num_threads(),
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "adapter_rank": RANK,
        "rounds": args.rounds,
        "rows": rows,
    }
    lines = [
        f"Multi-LoRA decode cost: `{args.base.name}` vs `{args.lora.name}` (lora {report['lora_section']}), "
        f"{PROMPT}-token prompts, {NEW_TOKENS} decode steps timed, rank-{RANK} adapters on all projections, "
        f"{report['threads']} threads, {args.rounds} rounds interleaved; CPU {report['cpu']} "
        f"({' '.join(report['cpu_flags'])})",
        "",
        "| batch | configuration | decode tok/s (best / median) | median vs base engine |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['config']} | {r['tok_s_best']} / {r['tok_s_median']} | {r['vs_base_median']} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Decode attention (paged_attention, one new token per sequence) per kernel tier: GFLOP/s at batch x context.

    python bench/decode_attention.py [--lib ENGINE/ops/llmbuild_ops.so] [--head-dim 64|128] [--out OUT]

TinyLlama-1.1B's attention (32 query heads, 4 kv heads, head dim 64; --head-dim 128 as Llama-3's), a bf16 cache in
blocks of 16, random values; one call per layer's worth of work, min and median over the rounds, the tiers the op
library holds (avx512, avx2, portable) interleaved in each round. `--lib` measures another op library (an engine's
own, e.g. one built before a change, or one built for x86-64-v3: its AVX2 loops get 16 vector registers, a native
build's get 32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmbuild.cpu_target import known_flags
from llmbuild.machine import cpu_flags, cpu_model
from llmbuild.plugins import load_plugins
from llmbuild.plugins.library import compiled_isas, use_isa

HEADS, KV_HEADS, BLOCK = 32, 4, 16
CASES = ((1, 2048), (16, 192), (16, 1024), (4, 4096))
"""(sequences, context length): batch-1 long context, the 16-stream benchmark's contexts, longer ones."""


def make_step(batch: int, ctx: int, head_dim: int, g: torch.Generator) -> tuple:
    """paged_attention's arguments for one decode token per sequence over `ctx` cached positions."""
    blocks = -(-ctx // BLOCK)
    cache = [torch.randn(batch * blocks, KV_HEADS, BLOCK, head_dim, generator=g).bfloat16() for _ in range(2)]
    tables = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    slots = torch.tensor([b * blocks * BLOCK + ctx - 1 for b in range(batch)])
    q = torch.randn(batch, HEADS, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(batch, KV_HEADS, head_dim, generator=g).bfloat16() for _ in range(2))
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    cu = torch.arange(batch + 1, dtype=torch.int32)
    return q, k, v, *cache, slots, tables, lens, cu, head_dim**-0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, help="an op library to measure (default: this machine's native one)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--head-dim", type=int, default=64, help="64: TinyLlama; 128: Llama-3")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    library = load_plugins(args.lib)
    g = torch.Generator().manual_seed(0)
    steps = {case: make_step(*case, args.head_dim, g) for case in CASES}
    tiers = compiled_isas()
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for case, step in steps.items():
            for tier in tiers:
                with use_isa(tier):
                    torch.ops.llmbuild.paged_attention(*step)  # warm
                    start = time.perf_counter()
                    torch.ops.llmbuild.paged_attention(*step)
                    times.setdefault((tier, *case), []).append(time.perf_counter() - start)
    rows = []
    for (tier, batch, ctx), t in times.items():
        flops = batch * HEADS * ctx * args.head_dim * 4  # q.k and p.v, multiply and add
        rows.append(
            {
                "tier": tier,
                "batch": batch,
                "context": ctx,
                "ms_min": round(min(t) * 1e3, 3),
                "ms_median": round(statistics.median(t) * 1e3, 3),
                "gflops": round(flops / min(t) / 1e9, 1),
            }
        )
    flags = sorted(cpu_flags() & known_flags())
    head = (
        f"paged_attention decode, {HEADS} / {KV_HEADS} heads x {args.head_dim}, bf16 cache; library {library}; "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds; CPU {cpu_model()} ({' '.join(flags)})"
    )
    table = ["| tier | batch | context | ms (min / median) | GFLOP/s |", "|---|---|---|---|---|"]
    table += [
        f"| {r['tier']} | {r['batch']} | {r['context']} | {r['ms_min']} / {r['ms_median']} | {r['gflops']} |"
        for r in rows
    ]
    text = head + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

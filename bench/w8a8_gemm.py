#!/usr/bin/env python3
"""W8A8 against bf16 and int8 weight-only, one linear op at a time: the GEMMs of prefill and batched decode.

    python bench/w8a8_gemm.py --threads 2 --rounds 7

One process, TinyLlama-1.1B's projection shapes (fused qkv, o, fused gate_up, down), random weights,
M = 1, 5, 16, 64 and 128 rows of x. Each round times every (shape, M, op) once, so a noisy machine slows
all alike; min and median over the rounds. Ops: bf16 F.linear (oneDNN's bf16 GEMM), llmbuild::linear_int8
(weight-only) and llmbuild::linear_w8a8 at each kernel tier the native op library holds (avx512 and
avx2: ours, csrc/linear_w8a8.cpp), and oneDNN's int8 matmul alone (torch._int_mm, what the avx512 tier ran
before) where the CPU has AVX512-VNNI. Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmbuild.machine import cpu_model
from llmbuild.plugins import load_plugins
from llmbuild.plugins.library import compiled_isas, use_isa
from llmbuild.plugins.linear_int8 import quantize_int8

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}  # (N, K)
ROWS = (1, 5, 16, 64, 128)


def ops(tiers: tuple[str, ...]) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]]:
    """name -> fn(x, w_bf16, q, scales), the w8a8 entries run at their tier."""

    def w8a8(tier: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
        def run(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
            with use_isa(tier):
                torch.ops.llmbuild.linear_w8a8(x, q, s, None)

        return run

    table: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]] = {
        "bf16 F.linear": lambda x, w, q, s: F.linear(x, w),
        "linear_int8": lambda x, w, q, s: torch.ops.llmbuild.linear_int8(x, q, s, None),
    }
    table.update({f"linear_w8a8 {t}": w8a8(t) for t in tiers if t != "portable"})
    if "avx512" in tiers:
        # what the avx512 tier ran before its own VNNI kernels: oneDNN's int8 matmul, without the op's
        # quantization and epilogue (so it flatters oneDNN slightly)
        table["torch._int_mm (oneDNN)"] = lambda x, w, q, s: torch._int_mm(x.to(torch.int8), q.t())
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_plugins()
    table = ops(compiled_isas())
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g).bfloat16()
        weights[name] = (w, *quantize_int8(w, torch.bfloat16))
    xs = {(name, m): torch.randn(m, k, generator=g).bfloat16() for name, (_, k) in SHAPES.items() for m in ROWS}
    times: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for round_ in range(args.rounds + 1):  # round 0 warms up (oneDNN primitive caches, page faults)
        for (name, m), x in xs.items():
            for op, fn in table.items():
                t0 = time.perf_counter()
                fn(x, *weights[name])
                if round_:
                    times[name, m, op].append(time.perf_counter() - t0)
    print(f"{cpu_model()}, {args.threads} threads, {args.rounds} rounds; ms min / median (GOPS at the min)\n")
    print("| shape (N x K) | M | " + " | ".join(table) + " |")
    print("|---|---|" + "---|" * len(table))
    for (name, m), _ in xs.items():
        n, k = SHAPES[name]
        cells = []
        for op in table:
            t = times[name, m, op]
            best = min(t)
            cells.append(f"{best * 1e3:.3f} / {statistics.median(t) * 1e3:.3f} ({2 * m * n * k / best / 1e9:.0f})")
        print(f"| {name} ({n} x {k}) | {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

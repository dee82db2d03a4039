#!/usr/bin/env python3
"""The decode kernels of each tier side by side: GB/s of weights streamed per linear op at batch 1 (and 16).

    python bench/kernel_tiers.py --out bench/results/kernel-tiers
    python bench/kernel_tiers.py --lib ENGINE/ops/llmbuild_ops.so --format bf16 --batch 16

One process, TinyLlama-1.1B's projection shapes (one layer's fused qkv, o, fused gate_up, down, and
lm_head), random weights. Rounds interleave the tiers (avx512, avx2, portable: those the op library holds
and this CPU runs) so that a noisy machine slows all alike; min and median over the rounds. The memory
read bandwidth measured in the same run is the ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmbuild.bench.offline import read_bandwidth_gbs
from llmbuild.cpu_target import known_flags
from llmbuild.machine import cpu_flags, cpu_model
from llmbuild.plugins import load_plugins
from llmbuild.plugins.library import compiled_isas, use_isa
from llmbuild.plugins.linear_int4 import pack_int4, quantize_int4
from llmbuild.plugins.linear_int8 import quantize_int8

SHAPES = {
    "qkv": (2560, 2048),
    "o": (2048, 2048),
    "gate_up": (11264, 2048),
    "down": (2048, 5632),
    "lm_head": (32000, 2048),
}


def weights(fmt: str) -> list[tuple]:
    """(op, weight args, K, bytes) per shape."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, k in SHAPES.values():
        w = torch.randn(n, k, generator=g) * 0.02
        if fmt == "bf16":
            args = (w.bfloat16(),)
            out.append((torch.ops.llmbuild.linear, args, k, n * k * 2))
        elif fmt == "int8":
            q, s = quantize_int8(w, torch.bfloat16)
            out.append((torch.ops.llmbuild.linear_int8, (q, s), k, n * k + n * 2))
        else:
            q, s, m = quantize_int4(w, 128)
            out.append((torch.ops.llmbuild.linear_int4, (pack_int4(q), s, m), k, n * k // 2 + 2 * s.numel() * 2))
    return out


def time_layer(layer: list[tuple], x: dict[int, torch.Tensor], batch: int, repeats: int) -> float:
    """Seconds for one pass over the layer's matrices (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for op, args, k, _ in layer:
            op(x[k][:batch], *args, None)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--format", choices=("bf16", "int8", "int4"), action="append")
    ap.add_argument(
        "--lib",
        type=Path,
        help="an op library to measure (an engine's ops/llmbuild_ops.so, e.g. one "
        "built for x86-64-v3); default: this CPU's native build",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    load_plugins(args.lib)
    torch.set_num_threads(2)
    x = {k: torch.randn(16, k).bfloat16() for k in (2048, 5632)}
    layers = {fmt: weights(fmt) for fmt in args.format or ("bf16", "int8", "int4")}
    tiers = compiled_isas()
    samples: dict[tuple, list[float]] = {}
    bandwidth = []
    for _ in range(args.rounds):
        bandwidth.append(read_bandwidth_gbs())
        for fmt, layer in layers.items():
            for batch in args.batch or [1]:
                for tier in tiers:
                    with use_isa(tier):
                        seconds = time_layer(layer, x, batch, args.repeats)
                    samples.setdefault((fmt, batch, tier), []).append(sum(b for *_, b in layer) / seconds / 1e9)
    rows = [
        {"format": f, "batch": b, "tier": t, "gbs_best": round(max(v), 1), "gbs_median": round(statistics.median(v), 1)}
        for (f, b, t), v in samples.items()
    ]
    report = {
        "cpu": cpu_model(),
        "cpu_isa_flags": " ".join(sorted(cpu_flags() & known_flags())),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbs": [round(min(bandwidth), 1), round(statistics.median(bandwidth), 1)],
        "rows": rows,
    }
    lines = [
        f"Decode kernels per tier, TinyLlama-1.1B projections (qkv, o, gate_up, down, lm_head), {args.rounds} "
        f"interleaved rounds; {report['cpu']}, {report['threads']} threads; library {args.lib or 'native'}; "
        f"read bandwidth {report['read_bandwidth_gbs'][1]} GB/s (median)",
        "",
        f"CPU flags: {report['cpu_isa_flags']}",
        "",
        "| format | batch | tier | GB/s of weights (best / median) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['format']} | {r['batch']} | {r['tier']} | {r['gbs_best']} / {r['gbs_median']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()

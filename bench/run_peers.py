#!/usr/bin/env python3
"""llmbuild engines side by side with llama.cpp (../shared/peers) in one session, rounds interleaved.

    PEERS_WORK=/path/to/scratch python bench/run_peers.py --pair llamacpp-q4_0=engines/tinyllama-int4 \\
        --pair llamacpp-q8_0=engines/tinyllama-int8 --batch 1 --batch 16 --rounds 2 \\
        --out bench/results/peers-tinyllama

Each measurement is a fresh process: the peer through the harness's `bench_peers.py child SPEC` (its
venv, its checkpoint), llmbuild through `llmbuild bench offline ENGINE` with one repeat. Within a round
the order is peer, llmbuild for each pair and batch, so load from other processes on this shared
machine hits both alike. Workload as in the harness: 128-token prompts, 128 new tokens, greedy, EOS
ignored. The peers need `../shared/peers/setup.sh` to have run with the same PEERS_WORK.

`--isa-limit avx2` keeps both sides to AVX2 on an AVX-512 machine: the llmbuild engines must be built for
`target.cpu: x86-64-v3` (no AVX-512 in their op library or compiled code), torch's own kernels are capped
with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 in every child, and
llama.cpp must be built without AVX-512 (setup.sh with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON" in its own PEERS_WORK); the report records llama.cpp's own system info
(AVX512 = 0) and each engine's target and kernel tier, and the script refuses an engine or peer that
would use AVX-512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmbuild.cpu_target import known_flags
from llmbuild.machine import cpu_flags, cpu_model

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"


ISA_LIMITS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def peer_run(spec: str, batch: int, threads: int) -> dict:
    work = Path(os.environ.get("PEERS_WORK", PEERS.parent.parent / "scratch" / "peers"))
    cmd = [str(work / "venv" / "bin" / "python"), str(PEERS / "bench_peers.py"), "child", f"{spec}@{batch}"]
    cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            r = result["runs"][0]
            info = result.get("info", {}).get("system_info", "")
            return {
                "ttft_ms": r["ttft_s"] * 1e3,
                "decode_tok_s": r["decode_tok_s"],
                "total_tok_s": r["total_tok_s"],
                "system_info": info,
            }
    raise RuntimeError(f"{spec}@{batch} failed (rc={p.returncode}): {p.stderr[-2000:]}")


def llmbuild_run(engine: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "llmbuild.cli", "bench", "offline", engine, "--batch", str(batch)]
        cmd += ["--repeats", "1", "--out", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        report = json.loads(out.with_suffix(".json").read_text())
    r = report["runs"][0]
    return {
        "ttft_ms": r["ttft_ms"],
        "decode_tok_s": r["decode_tok_s"],
        "total_tok_s": r["total_tok_s"],
        "system_info": f"target.cpu {report['target_cpu']}, kernels {report['kernel_isa']}, "
        f"torch {report['isa_limits'] or 'uncapped'}, load {report['load_s']} s",
    }


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["engine"], r["batch"]) for r in runs):
        group = [r for r in runs if (r["engine"], r["batch"]) == key]
        row = {"engine": key[0], "batch": key[1], "n": len(group)}
        for metric in ("ttft_ms", "decode_tok_s", "total_tok_s"):
            values = [r[metric] for r in group]
            best = min(values) if metric == "ttft_ms" else max(values)
            row[metric] = [round(best, 1), round(statistics.median(values), 1)]
        rows.append(row)
    return rows


def ratios(runs: list[dict], pairs: list[list[str]]) -> list[dict]:
    """Per pair and batch: llmbuild / peer decode and total tok/s, round by round (min, median, max)."""
    rows = []
    for spec, engine in pairs:
        for batch in sorted({r["batch"] for r in runs}):
            by_round = {}
            for r in runs:
                if r["batch"] == batch and r["engine"] in (spec, engine):
                    by_round.setdefault(r["round"], {})[r["engine"]] = r
            for metric in ("decode_tok_s", "total_tok_s"):
                values = [g[engine][metric] / g[spec][metric] for g in by_round.values() if len(g) == 2]
                if values:
                    rows.append(
                        {"pair": f"{engine} / {spec}", "batch": batch, "metric": metric,
                         "ratio": [round(min(values), 2), round(statistics.median(values), 2), round(max(values), 2)]}
                    )  # fmt: skip
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"llmbuild vs llama.cpp, one session, {report['rounds']} interleaved rounds; {report['machine']}",
        "",
        f"CPU flags: {report['cpu_isa_flags']}",
        "",
        f"ISA limit: {report['isa_limit'] or 'none'}; what each side ran: "
        + "; ".join(f"{k}: {v}" for k, v in report["system_info"].items()),
        "",
        "| engine | batch | TTFT ms (min / med) | decode tok/s (best / med) | total tok/s (best / med) |",
        "|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        cells = [f"{a} / {b}" for a, b in (row["ttft_ms"], row["decode_tok_s"], row["total_tok_s"])]
        lines.append(f"| {row['engine']} | {row['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "| llmbuild / peer | batch | metric | per-round ratio (min / median / max) |", "|---|---|---|---|"]
    for row in report["ratios"]:
        lo, med, hi = row["ratio"]
        lines.append(f"| {row['pair']} | {row['batch']} | {row['metric']} | {lo} / {med} / {hi} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", required=True, help="PEER_SPEC=ENGINE_DIR")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="write OUT.json and OUT.md")
    ap.add_argument("--isa-limit", choices=sorted(ISA_LIMITS), help="keep both sides to this ISA (see above)")
    args = ap.parse_args()
    pairs = [p.split("=", 1) for p in args.pair]
    if args.isa_limit:
        os.environ.update(ISA_LIMITS[args.isa_limit])
        for _, engine in pairs:
            target = json.loads((Path(engine) / "manifest.json").read_text())["target"]
            if any(f.startswith("avx512") for f in target["required_isa"]):
                sys.exit(f"error: {engine} targets {target['cpu']}, which uses AVX-512: build it for x86-64-v3")
    runs = []
    for rnd in range(args.rounds):
        for spec, engine in pairs:
            for batch in args.batch or [1]:
                for name in (spec, engine):
                    start = time.time()
                    result = peer_run(spec, batch, args.threads) if name == spec else llmbuild_run(engine, batch)
                    r = {"round": rnd, "engine": name, "batch": batch, "time": start, **result}
                    print(json.dumps(r), flush=True)
                    if args.isa_limit and name == spec and "AVX512 = 1" in r["system_info"]:
                        sys.exit(f"error: the peer {spec} runs AVX-512 ({r['system_info']}): rebuild it for AVX2")
                    runs.append(r)
    report = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads",
        "cpu_isa_flags": " ".join(sorted(cpu_flags() & known_flags())),
        "isa_limit": args.isa_limit,
        "system_info": {r["engine"]: r.pop("system_info") for r in runs},
        "rounds": args.rounds,
        "runs": runs,
        "summary": summarize(runs),
        "ratios": ratios(runs, pairs),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

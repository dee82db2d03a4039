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

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"


def peer_run(spec: str, batch: int, threads: int) -> dict:
    work = Path(os.environ.get("PEERS_WORK", PEERS.parent.parent / "scratch" / "peers"))
    cmd = [str(work / "venv" / "bin" / "python"), str(PEERS / "bench_peers.py"), "child", f"{spec}@{batch}"]
    cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])["runs"][0]
            return {"ttft_ms": r["ttft_s"] * 1e3, "decode_tok_s": r["decode_tok_s"], "total_tok_s": r["total_tok_s"]}
    raise RuntimeError(f"{spec}@{batch} failed (rc={p.returncode}): {p.stderr[-2000:]}")


def llmbuild_run(engine: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "llmbuild.cli", "bench", "offline", engine, "--batch", str(batch)]
        cmd += ["--repeats", "1", "--out", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        r = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    return {"ttft_ms": r["ttft_ms"], "decode_tok_s": r["decode_tok_s"], "total_tok_s": r["total_tok_s"]}


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


def markdown(report: dict) -> str:
    lines = [
        f"llmbuild vs llama.cpp, one session, {report['rounds']} interleaved rounds; {report['machine']}",
        "",
        "| engine | batch | TTFT ms (min / med) | decode tok/s (best / med) | total tok/s (best / med) |",
        "|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        cells = [f"{a} / {b}" for a, b in (row["ttft_ms"], row["decode_tok_s"], row["total_tok_s"])]
        lines.append(f"| {row['engine']} | {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", required=True, help="PEER_SPEC=ENGINE_DIR")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="write OUT.json and OUT.md")
    args = ap.parse_args()
    pairs = [p.split("=", 1) for p in args.pair]
    runs = []
    for rnd in range(args.rounds):
        for spec, engine in pairs:
            for batch in args.batch or [1]:
                for name in (spec, engine):
                    start = time.time()
                    result = peer_run(spec, batch, args.threads) if name == spec else llmbuild_run(engine, batch)
                    r = {"round": rnd, "engine": name, "batch": batch, "time": start, **result}
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = {
        "machine": f"{cpu}, {os.cpu_count()} cores, {args.threads} threads",
        "rounds": args.rounds,
        "runs": runs,
        "summary": summarize(runs),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Two llmbuild versions side by side: a regression check, one session, rounds interleaved.

    git worktree add /tmp/old <commit>      # the baseline's sources (build its engines with them)
    python bench/ab_versions.py --pair /tmp/old:engines/old-int4=.:engines/tinyllama-int4 --rounds 3 \\
        --batch 1 --out bench/results/ab-avx512

Each `--pair BASE_TREE:BASE_ENGINE=TREE:ENGINE` runs `llmbuild bench offline` with one repeat in a fresh process
per measurement, the baseline from BASE_TREE (so its own runtime and op library load), then the
current one; workload as in `llmbuild bench` (128-token prompt, 128 new tokens, greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmbuild.cpu_target import known_flags
from llmbuild.machine import cpu_flags, cpu_model


def run(tree: str, engine: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        root = Path(tree).resolve()
        env = {**os.environ, "PYTHONPATH": str(root)}
        cmd = [
            sys.executable,
            "-m",
            "llmbuild.cli",
            "bench",
            "offline",
            str(Path(engine).resolve()),
            "--batch",
            str(batch),
        ]
        # run from the tree: `python -m` puts the working directory first on sys.path
        subprocess.run([*cmd, "--repeats", "1", "--out", str(out)], check=True, capture_output=True, env=env, cwd=root)
        r = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    return {k: r[k] for k in ("ttft_ms", "decode_tok_s", "total_tok_s")}


CELLS = (("decode_tok_s", max), ("total_tok_s", max), ("ttft_ms", min))


def cell(values: list[float], best) -> str:
    return f"{best(values):.1f} / {statistics.median(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", required=True, help="BASE_TREE:BASE_ENGINE=TREE:ENGINE")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pairs = [[side.split(":", 1) for side in p.split("=", 1)] for p in args.pair]
    runs = []
    for rnd in range(args.rounds):
        for pair in pairs:
            for batch in args.batch or [1]:
                for role, (tree, engine) in zip(("base", "new"), pair, strict=True):
                    r = {"round": rnd, "role": role, "engine": engine, "batch": batch, **run(tree, engine, batch)}
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    lines = [
        f"llmbuild versions side by side, {args.rounds} interleaved rounds; {cpu_model()}, {os.cpu_count()} cores",
        "",
        f"CPU flags: {' '.join(sorted(cpu_flags() & known_flags()))}",
        "",
        "| engine | batch | decode tok/s (best / med) | total tok/s (best / med) | TTFT ms (min / med) |",
        "|---|---|---|---|---|",
    ]
    for engine, batch in dict.fromkeys((r["engine"], r["batch"]) for r in runs):
        group = [r for r in runs if (r["engine"], r["batch"]) == (engine, batch)]
        cells = [cell([r[key] for r in group], best) for key, best in CELLS]
        lines.append(f"| {engine} | {batch} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()

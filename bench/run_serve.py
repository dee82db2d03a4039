#!/usr/bin/env python3
"""Served throughput of the TinyLlama-shaped bf16 engine, side by side in one session with the same
engine offline (a static batch, no HTTP) and Hugging Face transformers bf16 (a static batch).

    python bench/run_serve.py          # -> bench/results/serve-tinyllama-bf16.{json,md}

Each repeat, in turn: `llmbuild serve` in its own process loaded by `llmbuild bench serve` (16
concurrent streams, 32 requests, 128-token prompts, 128 new tokens, greedy, EOS ignored), then
`llmbuild bench` offline at batch 16, then HF at batch 16, so a noisy machine slows all alike.
Needs the engine of bench/run_offline.py (engines/tinyllama-bf16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engines" / "tinyllama-bf16"
RESULTS = ROOT / "bench" / "results" / "serve-tinyllama-bf16"
PROMPT, NEW, STREAMS = 128, 128, 16


def start_server(port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmbuild.cli", "serve", str(ENGINE), "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit("server did not start")


def served(requests: int, concurrency: int) -> dict:
    from llmbuild.bench.load_generator import run_load

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        process = start_server(port, Path(tmp) / "server.log")
        try:
            return asyncio.run(run_load(f"http://127.0.0.1:{port}", concurrency, requests, PROMPT, NEW, seed=7))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)


def offline_batch(seed_repeats: int = 1) -> float:
    """llmbuild offline, static batch of STREAMS: total tok/s (new tokens / whole time)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "offline"
        cmd = [sys.executable, "-m", "llmbuild.cli", "bench", str(ENGINE), "--batch", str(STREAMS)]
        cmd += ["--prompt-len", str(PROMPT), "--new-tokens", str(NEW), "--repeats", str(seed_repeats)]
        subprocess.run([*cmd, "--out", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        report = json.loads(out.with_suffix(".json").read_text())
    return max(r["total_tok_s"] for r in report["runs"])


def hf_batch(seed: int) -> float:
    cmd = [sys.executable, str(ROOT / "bench" / "run_offline.py"), "--hf-child", str(STREAMS), str(PROMPT), str(NEW)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*cmd, str(seed)], check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["total_tok_s"]


def stats(values: list[float]) -> dict:
    return {"max": max(values), "median": statistics.median(values), "all": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=2 * STREAMS)
    args = ap.parse_args()
    if not (ENGINE / "manifest.json").is_file():
        sys.exit(
            f"{ENGINE} is missing: run bench/run_offline.py (or llmbuild compile bench/recipes/tinyllama-bf16.yaml)"
        )
    single = served(4, 1)
    loads, offline, hf = [], [], []
    for rep in range(args.repeats):
        loads.append(served(args.requests, STREAMS))
        offline.append(offline_batch())
        hf.append(hf_batch(rep))
        print(f"repeat {rep}: served {loads[-1]['output_tok_s']:.1f}, offline {offline[-1]:.1f}, hf {hf[-1]:.1f} tok/s")
    served_tok = [r["output_tok_s"] for r in loads]
    best = max(range(len(loads)), key=lambda i: served_tok[i])
    report = {
        "engine": ENGINE.name,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "workload": {"prompt_len": PROMPT, "max_tokens": NEW, "concurrency": STREAMS, "requests": args.requests},
        "served_output_tok_s": stats(served_tok),
        "offline_static_batch_tok_s": stats(offline),
        "hf_static_batch_tok_s": stats(hf),
        "served_vs_offline": statistics.median(s / o for s, o in zip(served_tok, offline, strict=True)),
        "served_vs_hf": statistics.median(s / h for s, h in zip(served_tok, hf, strict=True)),
        "step_overhead_fraction": stats([r["server"]["step_overhead_fraction"] for r in loads]),
        "best_load": loads[best],
        "single_stream": single,
        "loads": loads,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    from llmbuild.bench.load_generator import format_report

    w = r["workload"]
    s, o, h = r["served_output_tok_s"], r["offline_static_batch_tok_s"], r["hf_static_batch_tok_s"]
    ov = r["step_overhead_fraction"]
    return "\n".join(
        [
            f"engine `{r['engine']}` served by `llmbuild serve`, {r['machine']}, torch {r['torch']}; "
            f"{w['concurrency']} concurrent streams, {w['requests']} requests, prompt {w['prompt_len']}, "
            f"{w['max_tokens']} new tokens, greedy; {len(s['all'])} repeats (best / median)",
            "",
            "| path | output tok/s (best / median) |",
            "|---|---|",
            f"| llmbuild serve, HTTP streaming, 16 concurrent | {s['max']:.1f} / {s['median']:.1f} |",
            f"| llmbuild offline, static batch 16 (no HTTP) | {o['max']:.1f} / {o['median']:.1f} |",
            f"| HF transformers bf16, static batch 16 | {h['max']:.1f} / {h['median']:.1f} |",
            "",
            f"served / offline: {r['served_vs_offline']:.2f}; served / HF: {r['served_vs_hf']:.2f} "
            f"(medians of per-repeat ratios); step overhead (scheduling, inputs, detokenize, delivery) "
            f"{100 * ov['median']:.1f}% of step time (median)",
            "",
            "Best served run:",
            "",
            format_report(r["best_load"]),
            "Single stream (4 requests, unloaded latency):",
            "",
            format_report(r["single_stream"]),
        ]
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Offline benchmark of the TinyLlama-shaped bf16 engine, side by side with its eager path and with
Hugging Face transformers bf16 (a peer of DESIGN.md's table), all in one session on one checkpoint.

    python bench/run_offline.py                      # -> bench/results/offline-tinyllama-bf16.{json,md}

Makes the checkpoint (bench/make_random_checkpoint.py) and compiles bench/recipes/tinyllama-bf16.yaml
when missing; timing the compile is part of the report. Workload as in ../shared/peers: 128-token
prompts, 128 new tokens, greedy, EOS ignored, batch 1 and a static batch of 16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tinyllama-1.1b-random"
RECIPE = ROOT / "bench" / "recipes" / "tinyllama-bf16.yaml"
ENGINE = ROOT / "engines" / "tinyllama-bf16"
RESULTS = ROOT / "bench" / "results" / "offline-tinyllama-bf16"


def hf_child(batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    """One HF bf16 run in this process (called in a fresh child per run, so RSS is its own)."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from llmbuild.bench.offline import peak_rss_mib

    model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.bfloat16).eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def run(b: int, n: int, s: int) -> tuple[float, float, float]:
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(3, 4000, (b, prompt_len), generator=g)
        stamps.clear()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
        end = time.perf_counter()
        return stamps[0] - start, end - stamps[0], end - start

    run(1, 4, 99)
    ttft, decode, total = run(batch, new_tokens, seed)
    return {
        "backend": "hf-transformers",
        "batch": batch,
        "ttft_ms": ttft * 1e3,
        "decode_tok_s": batch * (new_tokens - 1) / decode,
        "total_tok_s": batch * new_tokens / total,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--hf-child", nargs=4, type=int, metavar=("BATCH", "PROMPT", "NEW", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_child:
        print(json.dumps(hf_child(*args.hf_child)))
        return

    from llmbuild.bench.offline import Run, bench_offline, format_markdown, summarize

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not (CKPT / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_random_checkpoint.py"), "--out", str(CKPT)],
            check=True,
            cwd=ROOT,
            env=env,
        )
    # built in its own process (its memory must not count as the engine's), from scratch, weights and all
    out = subprocess.run(
        [sys.executable, "-m", "llmbuild.cli", "compile", str(RECIPE), "-o", str(ENGINE), "--no-cache", "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    build = json.loads(out.stdout.strip().splitlines()[-1])
    report = bench_offline(ENGINE, tuple(args.batches), repeats=args.repeats, compare_eager=True)
    hf_runs = []
    for rep in range(args.repeats):
        for b in args.batches:
            out = subprocess.run(
                [sys.executable, __file__, "--hf-child", str(b), "128", "128", str(rep)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            hf_runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report["hf_peak_rss_mib"] = round(max(r.pop("peak_rss_mib") for r in hf_runs))
    report["runs"] += hf_runs
    report["summary"] = summarize([Run(**r) for r in report["runs"]])
    report["build_seconds"] = build["stages_seconds"]
    report["build_total_seconds"] = build["total_seconds"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = format_markdown(report) + (
        f"\nHF transformers bf16 peak RSS {report['hf_peak_rss_mib']} MiB. Build from scratch (no cache): "
        f"{report['build_total_seconds']:.0f} s, of which compile {report['build_seconds'].get('compile', 0):.0f} s.\n"
    )
    RESULTS.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

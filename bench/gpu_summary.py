#!/usr/bin/env python3
"""Issue 6's GPU targets, read off the reports of `bench/gpu_check.sh bench` (llmbuild bench offline JSON):

- bf16 decode at batch 1 against the HBM ceiling (weight bytes per token / measured read bandwidth): target >= 80%;
- CUDA graphs on vs off, at batch 1 and 64: target a measured speed-up at small batch;
- fp8 vs bf16 total tok/s at batch 64: target fp8 faster;
- where the fp8 engine stands against TensorRT-LLM's published 28,312 output tok/s (Llama-3.1-8B FP8, one H100,
  128/128; their figure is at their best batch, ours at 64).

    python bench/gpu_summary.py OUT_DIR [--shape llama3-1b]
        (OUT_DIR holding SHAPE-{bf16,fp8}-{cuda-graphs,no-cuda-graphs}-GPU.json; the TensorRT-LLM line: llama3-8b)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRT_LLM_FP8_TOK_S = 28312


def load(folder: Path, shape: str, fmt: str, graphs: str) -> dict:
    (path,) = folder.glob(f"{shape}-{fmt}-{graphs}-*.json")
    return json.loads(path.read_text())


def row(report: dict, batch: int) -> dict:
    (r,) = [r for r in report["summary"] if r["batch"] == batch]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--shape", default="llama3-8b", help="the checkpoint shape the engines were built from")
    args = ap.parse_args()
    runs = {
        (f, g): load(args.folder, args.shape, f, g) for f in ("bf16", "fp8") for g in ("cuda-graphs", "no-cuda-graphs")
    }
    bf16 = runs["bf16", "cuda-graphs"]
    gpu = bf16.get("gpu", bf16["machine"])
    lines = [
        f"{args.shape} shape, GPU {gpu}, torch {bf16['torch']}; "
        f"medians of {bf16['repeats']} repeats (best in brackets)",
        "",
    ]
    b1 = row(bf16, 1)
    share = b1["decode_tok_s_median"] / bf16["decode_ceiling_tok_s"]
    lines.append(
        f"- bf16 batch-1 decode {b1['decode_tok_s_median']:.1f} ({b1['decode_tok_s_best']:.1f}) tok/s = {share:.0%} of "
        f"the HBM ceiling {bf16['decode_ceiling_tok_s']:.1f} tok/s ({bf16['weight_bytes_read_per_token'] / 1e9:.2f} GB "
        f"per token at {bf16['read_bandwidth_gbs']:.0f} GB/s read); target >= 80%"
    )
    for fmt in ("bf16", "fp8"):
        for batch in (1, 64):
            on, off = row(runs[fmt, "cuda-graphs"], batch), row(runs[fmt, "no-cuda-graphs"], batch)
            key = "decode_tok_s_median"
            lines.append(
                f"- {fmt} batch {batch}: CUDA graphs {on[key]:.1f} vs without {off[key]:.1f} decode tok/s "
                f"({on[key] / off[key]:.2f}x)"
            )
    fp8_64, bf16_64 = row(runs["fp8", "cuda-graphs"], 64), row(bf16, 64)
    lines.append(
        f"- batch 64 total tok/s: fp8 {fp8_64['total_tok_s_median']:.0f} vs bf16 {bf16_64['total_tok_s_median']:.0f} "
        f"({fp8_64['total_tok_s_median'] / bf16_64['total_tok_s_median']:.2f}x); target fp8 faster"
    )
    if args.shape == "llama3-8b":
        lines.append(
            f"- fp8 at batch 64: {fp8_64['total_tok_s_median']:.0f} output tok/s over the whole run "
            "(prefill included) vs "
            f"TensorRT-LLM's published {TRT_LLM_FP8_TOK_S} (Llama-3.1-8B FP8, one H100, 128/128, their best batch; "
            f"a published reference, not a side-by-side run): {fp8_64['total_tok_s_median'] / TRT_LLM_FP8_TOK_S:.0%}"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (args.folder / f"summary-{args.shape}-{''.join(c if c.isalnum() else '-' for c in gpu)}.md").write_text(text)


if __name__ == "__main__":
    main()

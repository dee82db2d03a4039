#!/usr/bin/env python3
"""What checking k proposed tokens costs: one step of B sequences computing 1 + k tokens each, against a plain
decode step (k = 0), on one engine, in one process.

    python bench/spec_verify_cost.py [--engine engines/tinyllama-bf16] [--batch 1 4 16] [--rounds 5]
        -> bench/results/spec-verify-cost.{json,md}

Each sequence has a 128-token prompt in the KV cache; the step recomputes its last token and k proposed ones
(the tokens are arbitrary: the cost does not depend on them) and returns 1 + k logit rows per sequence, as a
verification step does. Rounds interleave k = 0..8; reported: min and median step time per (B, k) and the
ratio to k = 0. This curve decides num_speculative_tokens and speculative.max_batch_size: speculation pays
while (1 + expected accepted tokens) / cost ratio > 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmbuild.machine import cpu_flags, cpu_model  # noqa: E402
from llmbuild.runtime.llm_engine import LLMEngine  # noqa: E402
from llmbuild.runtime.sampling_params import SamplingParams  # noqa: E402
from llmbuild.runtime.scheduler import ScheduledSeq, StepBatch  # noqa: E402

PROMPT = 128
KS = range(0, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=ROOT / "engines" / "tinyllama-bf16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spec-verify-cost")
    args = parser.parse_args()
    llm = LLMEngine.from_dir(args.engine, enable_prefix_caching=False, speculative=False)
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.manifest.model.vocab_size
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    requests = [
        llm.make_request(torch.randint(3, vocab, (PROMPT,), generator=g).tolist(), params)
        for _ in range(max(args.batch))
    ]
    for request in requests:
        llm.add_request(request)
    while any(not r.output_token_ids for r in requests):  # prefill; every request now decodes
        llm.step()
    for request in requests:  # room for the largest verification
        assert llm.scheduler._reserve(request, request.num_computed_tokens + 1 + max(KS))
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in args.batch:
            for k in KS:
                drafts = tuple(range(5, 5 + k))
                batch = StepBatch(tuple(ScheduledSeq(r, 1 + k, True, drafts) for r in requests[:b]))
                llm.runner.execute(batch)  # warm this shape
                start = time.perf_counter()
                llm.runner.execute(batch)
                times.setdefault((b, k), []).append(time.perf_counter() - start)
    rows = []
    for b in args.batch:
        base = min(times[(b, 0)])
        for k in KS:
            t = times[(b, k)]
            rows.append(
                {
                    "batch": b,
                    "k": k,
                    "tokens": b * (1 + k),
                    "ms_min": round(min(t) * 1e3, 2),
                    "ms_median": round(statistics.median(t) * 1e3, 2),
                    "ratio_to_decode": round(min(t) / base, 2),
                }
            )
    report = {
        "engine": str(args.engine),
        "name": llm.engine.manifest.name,
        "dtype": llm.engine.manifest.dtype,
        "cpu": cpu_model(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}),
        "threads": torch.get_num_threads(),
        "prompt": PROMPT,
        "rounds": args.rounds,
        "rows": rows,
    }
    lines = [
        f"Verification step cost: engine `{report['name']}` ({report['dtype']}), {PROMPT}-token contexts, "
        f"{report['threads']} threads, {args.rounds} rounds interleaved; CPU {report['cpu']} "
        f"({' '.join(report['cpu_flags'])})",
        "",
        "| batch | k | tokens in step | ms (min / median) | cost / decode step |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['k']} | {r['tokens']} | {r['ms_min']} / {r['ms_median']} | {r['ratio_to_decode']} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()

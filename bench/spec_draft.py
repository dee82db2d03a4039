#!/usr/bin/env python3
"""Batch-1 decode speed with a draft engine proposing (speculative method draft, k = 4) against speculation off,
same target engine, in one process, rounds interleaved.

    python bench/spec_draft.py --target ENGINE --draft DRAFT_ENGINE [--rounds 3] [--new-tokens 48]
        -> OUT.{json,md} (default bench/results/spec-draft)

Workload: input-grounded prompts (a passage of the demo's held-out text, then its first half again: the answer
repeats what the prompt holds), one request at a time, greedy. Decode tok/s counts the tokens after the first
over the time from the first token to the last (the draft's catch-up of the prompt is in that time: it runs
in the first speculating step). Reported per mode: best and median of the rounds, and for the draft the
acceptance rate (accepted / proposed) and mean tokens per verification step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llmbuild.machine import cpu_flags, cpu_model  # noqa: E402
from llmbuild.recipe import SpeculativeSection  # noqa: E402
from llmbuild.runtime.llm_engine import LLMEngine  # noqa: E402
from llmbuild.runtime.sampling_params import SamplingParams  # noqa: E402

ISA = {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}
DRAFT = SpeculativeSection(method="draft", num_speculative_tokens=4, min_acceptance_rate=0.0, adaptive=False)


def grounded_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Held-out passages of about `length` tokens, then their first half again."""
    passages = [p for p in (ROOT / "models" / "demo" / "validation.txt").read_text().split("\n\n") if p.strip()]
    prompts = []
    for passage in passages[:count]:
        ids = tokenizer.encode(passage)[:length]
        prompts.append(ids + tokenizer.encode("\n\n") + ids[: len(ids) // 2])
    return prompts


def decode_round(llm: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    """(decode tokens, seconds) over the prompts, one request at a time."""
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        first = last = None
        n = 0
        for _ in llm.stream(llm.make_request(prompt, params)):
            last = time.perf_counter()
            first = first or last
            n += 1
        assert first is not None and last is not None
        tokens, seconds = tokens + n - 1, seconds + last - first
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spec-draft")
    args = parser.parse_args()
    engines = {
        "off": LLMEngine.from_dir(args.target, enable_prefix_caching=False, speculative=False),
        "draft k=4": LLMEngine.from_dir(
            args.target, enable_prefix_caching=False, speculative=DRAFT, draft_engine=args.draft
        ),
    }
    prompts = grounded_prompts(engines["off"].tokenizer, args.prompts, args.prompt_len)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for llm in engines.values():  # warm-up
        decode_round(llm, prompts[:1], params)
    spec = engines["draft k=4"].speculator
    assert spec is not None
    drafted, accepted, verified = spec.num_draft_tokens, spec.num_accepted_tokens, spec.num_verifications
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            tokens, seconds = decode_round(llm, prompts, params)
            rates[name].append(tokens / seconds)
    drafted, accepted = spec.num_draft_tokens - drafted, spec.num_accepted_tokens - accepted
    verified = spec.num_verifications - verified
    report = {
        "target": str(args.target),
        "draft": str(args.draft),
        "workload": f"{len(prompts)} grounded prompts of ~{args.prompt_len * 3 // 2} tokens, {args.new_tokens} new",
        "rounds": args.rounds,
        "decode_tok_s": {
            name: {"best": max(r), "median": statistics.median(r), "rounds": r} for name, r in rates.items()
        },
        "acceptance_rate": accepted / max(drafted, 1),
        "mean_accepted_per_verification": accepted / max(verified, 1),
        "speedup_median": statistics.median(rates["draft k=4"]) / statistics.median(rates["off"]),
        "cpu": cpu_model(),
        "cpu_flags": sorted(cpu_flags() & ISA),
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Draft-engine speculation, batch-1 decode",
        "",
        f"target {report['target']}, draft {report['draft']}; {report['workload']}; {args.rounds} rounds interleaved.",
        f"CPU {report['cpu']} ({' '.join(report['cpu_flags'])}), {report['threads']} threads.",
        "",
        "| mode | best tok/s | median tok/s |",
        "|---|---|---|",
        *(f"| {n} | {d['best']:.1f} | {d['median']:.1f} |" for n, d in report["decode_tok_s"].items()),
        "",
        f"acceptance rate {report['acceptance_rate']:.2f}, mean accepted per verification "
        f"{report['mean_accepted_per_verification']:.2f}, median speedup {report['speedup_median']:.2f}x",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

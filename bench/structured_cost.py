#!/usr/bin/env python3
"""What a JSON-schema constraint costs: decode tok/s with and without it, batch 1 and 16, in one process.

    python bench/structured_cost.py [--engine engines/tinyllama-bf16] [--rounds 3]
        -> bench/results/structured-output-cost.{json,md}

Workload: 16-token prompts, 64 new tokens, greedy. The constrained requests follow a schema that a
64-token answer cannot complete (an array of at least 200 small integers), so both sides decode the same
number of tokens; the free requests ignore EOS. Rounds interleave the two sides; the grammar is compiled
once before the first round (its compile time is reported apart, cold, for a typical and a large schema),
so the rounds measure the per-step cost: filling the masks (in place on a CPU engine)
and applying them. Reported: min and median over rounds.
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

from llmbuild.machine import cpu_flags, cpu_model  # noqa: E402
from llmbuild.runtime.llm_engine import LLMEngine  # noqa: E402
from llmbuild.runtime.sampling_params import SamplingParams  # noqa: E402
from llmbuild.runtime.structured_output import Grammar, GrammarCompiler  # noqa: E402

NEW_TOKENS = 64
LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 200}
TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role"],
}


def large_schema() -> dict:
    """60 properties, nested 4 deep, anyOf and an enum of 200 values."""
    leaf = {"anyOf": [{"type": "string"}, {"type": "integer"}, {"enum": [f"v{i}" for i in range(200)]}]}
    nested = leaf
    for depth in range(4):
        nested = {"type": "object", "properties": {f"level{depth}": nested, "note": {"type": "string"}}}
    props = {f"field{i}": (nested if i % 10 == 0 else {"type": ["string", "integer", "null"]}) for i in range(60)}
    return {"type": "object", "properties": props, "required": [f"field{i}" for i in range(0, 60, 7)]}


def decode_rate(llm: LLMEngine, batch: int, params: SamplingParams) -> float:
    """New tokens per second over the run (prefill of 16-token prompts included, as in a short request)."""
    prompts = [[3 + (7 * i + j) % 3000 for j in range(16)] for i in range(batch)]
    start = time.perf_counter()
    done = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    assert tokens == batch * NEW_TOKENS, f"{tokens} tokens, expected {batch * NEW_TOKENS}"
    return tokens / elapsed


def compile_seconds(llm: LLMEngine, schema: dict) -> float:
    """A cold compile (a fresh compiler: no cache) of `schema` against the engine's tokenizer, tokenizer
    set-up excluded."""
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.manifest.model.vocab_size)
    compiler.matcher(Grammar.json_schema({"type": "integer"}))  # builds the llguidance tokenizer
    start = time.perf_counter()
    compiler.matcher(Grammar.json_schema(schema))  # includes the first mask, where llguidance does lazy work
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, default=ROOT / "engines" / "tinyllama-bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "structured-output-cost")
    args = ap.parse_args()

    llm = LLMEngine.from_dir(args.engine)
    free = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, structured=Grammar.json_schema(LONG_ARRAY))
    compiles = {name: compile_seconds(llm, s) for name, s in (("typical", TYPICAL), ("large", large_schema()))}
    llm.grammars.matcher(constrained.structured)  # compiled once, as a server's cache would have it
    for batch in (1, 16):  # warm-up
        decode_rate(llm, batch, free)
        decode_rate(llm, batch, constrained)
    rates: dict[str, list[float]] = {f"{side} b{b}": [] for b in (1, 16) for side in ("free", "json")}
    for _ in range(args.rounds):
        for batch in (1, 16):
            rates[f"free b{batch}"].append(decode_rate(llm, batch, free))
            rates[f"json b{batch}"].append(decode_rate(llm, batch, constrained))
    summary = {k: {"min": min(v), "median": statistics.median(v), "all": v} for k, v in rates.items()}
    result = {
        "engine": str(args.engine.relative_to(ROOT) if args.engine.is_relative_to(ROOT) else args.engine),
        "cpu": cpu_model(),
        "cpu_flags": sorted(cpu_flags()),
        "rounds": args.rounds,
        "new_tokens": NEW_TOKENS,
        "tok_per_s": summary,
        "compile_seconds": compiles,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Structured output cost: decode with and without a JSON-schema constraint",
        "",
        f"Engine `{result['engine']}`, {args.rounds} interleaved rounds, 16-token prompts, {NEW_TOKENS} new tokens, "
        "greedy; llguidance masks filled before each forward pass (in place on a CPU engine: StepMasks).",
        f"CPU: {result['cpu']}; flags: {' '.join(result['cpu_flags'])}",
        "",
        "| batch | free tok/s (min / median) | JSON schema tok/s (min / median) | median cost |",
        "|---:|---:|---:|---:|",
    ]
    for b in (1, 16):
        f, j = summary[f"free b{b}"], summary[f"json b{b}"]
        cost = 1 - j["median"] / f["median"]
        lines.append(
            f"| {b} | {f['min']:.1f} / {f['median']:.1f} | {j['min']:.1f} / {j['median']:.1f} | {cost * 100:+.1f}% |"
        )
    lines += [
        "",
        f"Grammar compile (cold, first mask included): typical schema {compiles['typical'] * 1e3:.1f} ms, "
        f"large schema (60 properties, 4 deep, anyOf, 200-value enum) {compiles['large'] * 1e3:.1f} ms.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

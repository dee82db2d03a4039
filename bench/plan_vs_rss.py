#!/usr/bin/env python3
"""`llmbuild plan`'s memory estimate against the measured peak resident set of a real run.

For each engine: the plan of its recipe (weights + KV cache + activations of the largest step +
overhead), then a fresh process that loads the engine and runs the largest step the limits allow
(min(max_num_tokens, max_batch_size x max_seq_len) tokens, every prompt position scored, so that every
logit row exists) and reports its VmHWM (/proc/self/status: the peak resident set, load included).

    python bench/plan_vs_rss.py                                   # builds both engines under --work
    python bench/plan_vs_rss.py --tinyllama-engine engines/tinyllama-bf16 --demo-engine DIR

The TinyLlama-shaped checkpoint is written by bench/make_random_checkpoint.py when missing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"demo": ROOT / "recipes/demo.yaml", "tinyllama-bf16": ROOT / "bench/recipes/tinyllama-bf16.yaml"}
TINYLLAMA_CHECKPOINT = ROOT / "checkpoints/tinyllama-1.1b-random"
MIB = 1 << 20


def child(engine_dir: Path) -> None:
    """Load the engine, run its largest step, print {"peak_rss": bytes, "step_tokens": n} on stdout."""
    from llmbuild.memory_plan import largest_step_tokens
    from llmbuild.runtime.llm_engine import LLMEngine
    from llmbuild.runtime.sampling_params import SamplingParams

    llm = LLMEngine.from_dir(engine_dir, verify=False)
    limits, vocab = llm.limits, llm.engine.manifest.model.vocab_size
    tokens, prompt_len = largest_step_tokens(limits), limits.max_seq_len - 1
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(math.ceil(tokens / prompt_len))]
    llm.generate(prompts[: limits.max_batch_size], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss": peak, "step_tokens": tokens}))


def build(recipe: Path, out: Path, cache: Path) -> Path:
    """Build `recipe` into `out` (kept between runs of this script)."""
    if not (out / "manifest.json").is_file():
        from llmbuild.builder.build import build_engine
        from llmbuild.recipe import load_recipe

        build_engine(load_recipe(recipe), out, cache_dir=cache)
    return out


def measure(name: str, engine: Path) -> dict[str, float]:
    """The plan's figures and the measured peak of one engine, in MiB."""
    from llmbuild.builder.plan import make_plan
    from llmbuild.manifest import Manifest
    from llmbuild.recipe import load_recipe

    plan = make_plan(load_recipe(RECIPES[name]), available_bytes=1 << 50)
    if Manifest.load(engine).limits != plan.limits:
        sys.exit(f"{engine} was built with other limits than {RECIPES[name]}; rebuild it")
    run = subprocess.run(
        [sys.executable, __file__, "--child", str(engine)], check=True, capture_output=True, text=True, cwd=ROOT
    )
    peak = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss"]
    m = plan.memory
    return {
        "weights": m.weight_bytes / MIB,
        "kv": (m.total_bytes - m.weight_bytes) / MIB,
        "activations": m.activation_bytes / MIB,
        "overhead": m.overhead_bytes / MIB,
        "plan": m.required_bytes / MIB,
        "peak": peak / MIB,
        "error": (m.required_bytes - peak) / peak * 100,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--demo-engine", type=Path, help="a built recipes/demo.yaml engine (default: build one)")
    ap.add_argument("--tinyllama-engine", type=Path, help="a built bench/recipes/tinyllama-bf16.yaml engine")
    ap.add_argument("--work", type=Path, default=Path("/tmp/plan_vs_rss"), help="engines and build cache")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    if args.tinyllama_engine is None and not TINYLLAMA_CHECKPOINT.exists():
        sys.path.insert(0, str(ROOT))
        from bench.make_random_checkpoint import make

        make(TINYLLAMA_CHECKPOINT)
    cache = args.work / "cache"
    engines = {
        "demo": args.demo_engine or build(RECIPES["demo"], args.work / "demo", cache),
        "tinyllama-bf16": args.tinyllama_engine or build(RECIPES["tinyllama-bf16"], args.work / "tinyllama", cache),
    }
    cols = ("weights", "kv", "activations", "overhead", "plan", "peak", "error")
    print(f"{'engine':<16}" + "".join(f"{c:>13}" for c in cols) + "   (MiB; error = (plan - peak) / peak, %)")
    for name, engine in engines.items():
        row = measure(name, engine)
        print(f"{name:<16}" + "".join(f"{row[c]:>13.1f}" for c in cols))


if __name__ == "__main__":
    main()

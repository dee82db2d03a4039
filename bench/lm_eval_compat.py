#!/usr/bin/env python3
"""lm-eval-harness against `llmbuild serve`: the same per-sample results as lm-eval's own `hf` backend.

Runs lm-eval's two local tasks of bench/lm_eval/ (llmbuild_mc: multiple choice, loglikelihood requests;
llmbuild_gen: greedy generate_until) twice on the committed demo model:

  - `--model local-completions` against `llmbuild serve` of an fp32 engine of models/demo
    (bench/lm_eval/demo-fp32.yaml), which sends token ids to /v1/completions (echo + logprobs for
    loglikelihood, max_tokens + stop for generations);
  - `--model hf` on models/demo itself in float32;

then compares sample by sample: every choice's log-likelihood within --atol (1e-3), the same is_greedy
and acc, identical generations. Prints a table, writes bench/results/lm-eval-compat.{md,json}, and exits
non-zero if anything differs.

lm-eval lives in its own venv, reusing the project's torch (pinned, so pip pulls no other build):

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install "lm-eval[hf,api]==0.4.13" torch==2.13.0 transformers==5.24.0
    .venv/bin/python bench/lm_eval_compat.py --lm-eval-venv /tmp/lmeval-venv

Both runs are offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, a fresh HF_HOME in the work folder): the
tasks read bench/lm_eval/*.jsonl. Both add the BOS token (add_bos_token=True), as `llmbuild serve` does
for text prompts; lm-eval's API backends leave it out by default, its hf backend follows the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "bench" / "lm_eval"
TASKS = ("llmbuild_mc", "llmbuild_gen")
CHECKPOINT = ROOT / "models" / "demo"
RECIPE = TASK_DIR / "demo-fp32.yaml"
ENGINE = ROOT / "engines" / "lm-eval-demo-fp32"
MODEL_NAME = "lm-eval-demo-fp32"
RESULTS = ROOT / "bench" / "results" / "lm-eval-compat"


def build_engine(env: dict[str, str]) -> None:
    """Compile the fp32 demo engine (the build cache makes a rebuild quick)."""
    subprocess.run(
        [sys.executable, "-m", "llmbuild.cli", "compile", str(RECIPE), "-o", str(ENGINE)],
        check=True,
        cwd=ROOT,
        env=env,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path, env: dict[str, str], timeout: float = 300) -> subprocess.Popen:
    """`llmbuild serve` of the engine on 127.0.0.1:port, once /ready answers 200."""
    cmd = [sys.executable, "-m", "llmbuild.cli", "serve", str(ENGINE), "--port", str(port)]
    cmd += ["--model-name", MODEL_NAME, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmbuild serve exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"llmbuild serve not ready after {timeout:.0f} s; see {log}")


def lm_eval_command(venv: Path, model: str, model_args: dict[str, object], out: Path) -> list[str]:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [str(venv / "bin" / "lm_eval"), "--model", model, "--model_args", args, "--tasks", ",".join(TASKS)]
    cmd += ["--include_path", str(TASK_DIR), "--batch_size", "1", "--log_samples", "--output_path", str(out)]
    return cmd + (["--device", "cpu"] if model == "hf" else [])


def run_lm_eval(cmd: list[str], log: Path, work: Path) -> None:
    """One lm_eval run, offline, from the task folder (the tasks' data_files are relative to it)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=TASK_DIR, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"lm_eval exited with {rc}; see {log}")


def read_samples(out: Path, task: str) -> dict[int, dict]:
    """A run's logged samples of `task`, by doc_id (the newest file if the folder holds several runs)."""
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no samples of {task} under {out}")
    samples = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return {s["doc_id"]: s for s in samples}


def compare_mc(hf: dict[int, dict], api: dict[int, dict], atol: float) -> dict:
    """Per choice: |Δ loglikelihood| and is_greedy; per doc: acc and acc_norm."""
    max_delta, greedy_diff, acc_diff, worst = 0.0, 0, 0, None
    for doc_id, h in hf.items():
        a = api[doc_id]
        for (ll_h, g_h), (ll_a, g_a) in zip(h["filtered_resps"], a["filtered_resps"], strict=True):
            delta = abs(float(ll_h) - float(ll_a))
            if delta > max_delta:
                max_delta, worst = delta, {"doc_id": doc_id, "hf": float(ll_h), "llmbuild": float(ll_a)}
            greedy_diff += g_h != g_a
        acc_diff += h["acc"] != a["acc"] or h["acc_norm"] != a["acc_norm"]
    return {
        "type": "multiple_choice",
        "samples": len(hf),
        "loglikelihoods": sum(len(s["filtered_resps"]) for s in hf.values()),
        "max_abs_delta_loglikelihood": max_delta,
        "worst": worst,
        "is_greedy_differs": greedy_diff,
        "is_greedy_true_hf": sum(g == "True" for s in hf.values() for _, g in s["filtered_resps"]),
        "acc_differs": acc_diff,
        "acc_hf": mean(s["acc"] for s in hf.values()),
        "acc_llmbuild": mean(s["acc"] for s in api.values()),
        "acc_norm_hf": mean(s["acc_norm"] for s in hf.values()),
        "acc_norm_llmbuild": mean(s["acc_norm"] for s in api.values()),
        "ok": set(hf) == set(api) and max_delta <= atol and greedy_diff == 0 and acc_diff == 0,
    }


def compare_gen(hf: dict[int, dict], api: dict[int, dict]) -> dict:
    """Generations must be identical strings."""
    differ = [
        {"doc_id": d, "hf": h["resps"][0][0], "llmbuild": api[d]["resps"][0][0]}
        for d, h in hf.items()
        if h["resps"][0][0] != api[d]["resps"][0][0]
    ]
    return {
        "type": "generate_until",
        "samples": len(hf),
        "identical_generations": len(hf) - len(differ),
        "differing": differ,
        "examples": [{"prompt": h["doc"]["prompt"], "generation": h["resps"][0][0]} for h in list(hf.values())[:3]],
        "ok": set(hf) == set(api) and not differ,
    }


def shown(arg: str, venv: Path) -> str:
    """A command's argument as the report shows it: paths relative to the repository, the venv as $LM_EVAL_VENV,
    the server's port as PORT."""
    shown = str(arg).replace(str(venv), "$LM_EVAL_VENV").replace(str(ROOT) + "/", "")
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", shown)


def versions(venv: Path) -> dict[str, str]:
    """lm-eval, transformers and torch in lm-eval's venv."""
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('lm-eval', 'transformers', 'torch', 'tokenizers')}))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def machine_info() -> dict:
    from llmbuild import __version__
    from llmbuild.cpu_target import known_flags
    from llmbuild.machine import cpu_flags, cpu_model

    return {"llmbuild": __version__, "cpu": cpu_model(), "cpu_isa_flags": sorted(cpu_flags() & known_flags())}


def format_markdown(report: dict) -> str:
    v, m = report["lm_eval_venv"], report["machine"]
    lines = [
        "# lm-eval-harness: `local-completions` against `llmbuild serve` vs lm-eval's `hf` backend",
        "",
        f"lm-eval {v['lm-eval']} (its venv: transformers {v['transformers']}, torch {v['torch']}); "
        f"llmbuild {m['llmbuild']}; engine `{report['engine']}` (models/demo in float32, compiled) "
        "vs `hf` on models/demo in float32. Tasks: bench/lm_eval/ (local jsonl, offline). "
        f"Tolerance on each log-likelihood: {report['atol']:g}.",
        "",
        f"CPU: {m['cpu']}  ",
        f"CPU flags: {' '.join(m['cpu_isa_flags'])}",
        "",
        "| task | requests | samples | max \\|Δ loglikelihood\\| | is_greedy differs | acc (norm) hf "
        "| acc (norm) llmbuild | identical generations | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, r in report["tasks"].items():
        if r["type"] == "multiple_choice":
            lines.append(
                f"| {task} | loglikelihood ({r['loglikelihoods']}) | {r['samples']} | "
                f"{r['max_abs_delta_loglikelihood']:.2e} | {r['is_greedy_differs']} of {r['loglikelihoods']} "
                f"({r['is_greedy_true_hf']} greedy) | {r['acc_hf']:.4f} ({r['acc_norm_hf']:.4f}) | "
                f"{r['acc_llmbuild']:.4f} ({r['acc_norm_llmbuild']:.4f}) | | {'yes' if r['ok'] else '**no**'} |"
            )
        else:
            lines.append(
                f"| {task} | generate_until | {r['samples']} | | | | | {r['identical_generations']}/{r['samples']} | "
                f"{'yes' if r['ok'] else '**no**'} |"
            )
    lines += ["", f"Result: **{'PASS' if report['ok'] else 'FAIL'}**", ""]
    lines += [
        "Commands (from bench/lm_eval, where the tasks' data_files lie; `llmbuild serve` of the engine on PORT):",
        "",
    ]
    lines += [f"    {' '.join(c)}" for c in report["commands"]]
    gen = next((r for r in report["tasks"].values() if r["type"] == "generate_until"), None)
    if gen:
        lines += ["", "Some greedy generations (both backends):", ""]
        lines += [f"- {e['prompt']!r} → {e['generation']!r}" for e in gen["examples"]]
        lines += [f"- differs, doc {d['doc_id']}: hf {d['hf']!r}, llmbuild {d['llmbuild']!r}" for d in gen["differing"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lm-eval-venv",
        type=Path,
        default=os.environ.get("LM_EVAL_VENV"),
        help="venv with lm-eval[hf,api] (env LM_EVAL_VENV)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "engines" / "lm-eval-work", help="lm-eval outputs and logs")
    ap.add_argument("--atol", type=float, default=1e-3, help="largest |Δ loglikelihood| accepted per choice")
    ap.add_argument(
        "--num-concurrent", type=int, default=4, help="local-completions' concurrent requests (batched by the server)"
    )
    ap.add_argument("--skip-hf", action="store_true", help="reuse the hf run already in --work")
    args = ap.parse_args()
    if args.lm_eval_venv is None or not (args.lm_eval_venv / "bin" / "lm_eval").is_file():
        ap.error("--lm-eval-venv: a venv with lm-eval installed is needed (see this script's docstring)")
    venv, work = args.lm_eval_venv.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    hf_args = {"pretrained": CHECKPOINT, "dtype": "float32", "add_bos_token": True}
    hf_cmd = lm_eval_command(venv, "hf", hf_args, work / "hf")
    if not args.skip_hf:
        run_lm_eval(hf_cmd, work / "hf.log", work)

    build_engine(env)
    port = free_port()
    api_args = {
        "model": MODEL_NAME,
        "base_url": f"http://127.0.0.1:{port}/v1/completions",
        "tokenizer": CHECKPOINT,
        "tokenizer_backend": "huggingface",
        "add_bos_token": True,
        "max_length": 1024,
        "num_concurrent": args.num_concurrent,
        "max_retries": 1,
    }
    api_cmd = lm_eval_command(venv, "local-completions", api_args, work / "llmbuild")
    server = start_server(port, work / "serve.log", env)
    try:
        run_lm_eval(api_cmd, work / "llmbuild.log", work)
    finally:
        server.terminate()
        server.wait(timeout=60)

    tasks = {
        "llmbuild_mc": compare_mc(
            read_samples(work / "hf", "llmbuild_mc"), read_samples(work / "llmbuild", "llmbuild_mc"), args.atol
        ),
        "llmbuild_gen": compare_gen(
            read_samples(work / "hf", "llmbuild_gen"), read_samples(work / "llmbuild", "llmbuild_gen")
        ),
    }
    report = {
        "lm_eval_venv": versions(venv),
        "machine": machine_info(),
        "engine": ENGINE.name,
        "atol": args.atol,
        "num_concurrent": args.num_concurrent,
        "commands": [[shown(c, venv) for c in cmd] for cmd in (hf_cmd, api_cmd)],
        "tasks": tasks,
        "ok": all(t["ok"] for t in tasks.values()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = format_markdown(report)
    RESULTS.with_suffix(".md").write_text(text)
    print(text)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

"""`llmbuild bench ENGINE`: offline TTFT, decode and batch throughput of an engine, measured in-process.

With `compare_eager` the engine's exported program runs too, in the same process, runs interleaved
(compiled, eager, compiled, eager, ...) so that a noisy machine slows both alike. The memory read
bandwidth is measured in the same run, giving the batch-1 decode ceiling (bandwidth / weight bytes
read per token). Results: min and median over the repeats. The report names the CPU, its instruction-set
flags and the kernel tier that ran, and the engine's load time (op library, graph, weights).
"""

from __future__ import annotations

import functools
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import llmbuild
from llmbuild.cpu_target import known_flags
from llmbuild.machine import cpu_flags, cpu_model
from llmbuild.plugins.library import compiled_isas
from llmbuild.recipe import SpeculativeSection
from llmbuild.runtime.llm_engine import LLMEngine
from llmbuild.runtime.sampling_params import SamplingParams

ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the ISA of torch's own kernels (ATen, oneDNN, MKL)."""


@dataclass(frozen=True)
class Run:
    backend: str
    batch: int
    ttft_ms: float
    """Prefill of every prompt until each has its first token."""
    decode_tok_s: float
    """batch x (new_tokens - 1) / time after the first token."""
    total_tok_s: float
    """batch x new_tokens / whole time."""
    draft_tokens: int = 0
    """Tokens proposed by speculative decoding during the run."""
    accepted_tokens: int = 0
    """Proposed tokens accepted."""
    verifications: int = 0
    """Sequence-steps that checked proposals."""


WORKLOADS = ("random", "repeat", "text", "grounded")
"""Prompts: random tokens; random tokens whose second half repeats the first (a copy test: whether the
answer goes on repeating is the model's doing); held-out English prose (`text`); or `grounded`, held-out prose
in which the answer is asked to repeat the prompt's text, as in summarization or code editing: a passage, a
blank line, then the passage's first tokens again, so that a model that follows its input writes the rest of
the passage (the prompt-lookup case of speculative decoding). The prose is llmbuild/data/heldout.txt (Python
documentation the demo model was not trained on), tokenized by the engine's tokenizer."""
HELD_OUT_TEXT = Path(llmbuild.__file__).parent / "data" / "heldout.txt"
GROUNDED_CUE = 8
"""Tokens of the passage repeated after it: the start the answer is to go on from."""


@functools.cache
def _held_out_paragraphs() -> tuple[str, ...]:
    """The held-out text's paragraphs (read once per process, not once per prompt)."""
    return tuple(p.strip() for p in HELD_OUT_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip())


def make_prompt(g: torch.Generator, llm: LLMEngine, prompt_len: int, workload: str) -> list[int]:
    """One benchmark prompt of `prompt_len` tokens (see WORKLOADS)."""
    vocab = llm.engine.manifest.model.vocab_size
    if workload == "random":
        return torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
    if workload == "repeat":
        half = torch.randint(3, vocab, ((prompt_len + 1) // 2,), generator=g).tolist()
        return (half + half)[:prompt_len]
    paragraphs = _held_out_paragraphs()
    first = int(torch.randint(0, len(paragraphs), (1,), generator=g))
    text = "\n\n".join(paragraphs[first:] + paragraphs[:first])  # from a seeded paragraph on, wrapping round
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    ids *= prompt_len // len(ids) + 1  # ~16k tokens of text: a longer prompt reads it again
    if workload == "text":
        return ids[:prompt_len]
    blank = llm.tokenizer.encode("\n\n", add_special_tokens=False)
    cue = min(GROUNDED_CUE, max(prompt_len // 4, 1))
    passage = ids[: max(prompt_len - len(blank) - cue, 1)]
    return (passage + blank + passage[:cue])[:prompt_len]


def run_once(
    llm: LLMEngine, batch: int, prompt_len: int, new_tokens: int, seed: int, workload: str = "random"
) -> tuple[float, float, float]:
    """One static batch of prompts (see WORKLOADS), greedy, EOS ignored: (ttft s, decode s, total s)."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [llm.make_request(make_prompt(g, llm, prompt_len, workload), params) for _ in range(batch)]
    start = time.perf_counter()
    for request in requests:
        llm.add_request(request)
    while any(not r.output_token_ids for r in requests):
        llm.step()
    first = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
    end = time.perf_counter()
    return first - start, end - first, end - start


def read_bandwidth_gbs(device: torch.device | str = "cpu", samples: int = 5) -> float:
    """Best read bandwidth of `device`'s memory over a 1 GiB buffer (a torch sum, all threads), GB/s."""
    buf = torch.ones(2**28, dtype=torch.float32, device=device)
    buf.sum()
    best = min(_timed(lambda: buf.sum().item()) for _ in range(samples))  # item(): wait for a GPU
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent across fork + exec, so a child process would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(
    engines: dict[str, LLMEngine],
    engine_dir: Path,
    batches: tuple[int, ...],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    workload: str,
) -> tuple[list[Run], float]:
    """The runs of every engine in `engines`, interleaved, and the first one's peak RSS."""
    manifest = engines["engine"].engine.manifest
    for b in batches:
        if b > manifest.limits.max_batch_size:
            raise ValueError(f"batch {b} exceeds the engine's max_batch_size {manifest.limits.max_batch_size}")
    run_once(engines["engine"], 1, min(prompt_len, 16), 4, seed=99)  # warm-up
    rss_engine = peak_rss_mib()
    for name, llm in engines.items():
        if name != "engine":
            run_once(llm, 1, min(prompt_len, 16), 4, seed=99)
    runs: list[Run] = []
    for rep in range(repeats):
        for b in batches:
            for name, llm in engines.items():
                before = _speculation_counts(llm)
                ttft, decode, total = run_once(llm, b, prompt_len, new_tokens, rep, workload)
                spec = [after - was for after, was in zip(_speculation_counts(llm), before, strict=True)]
                rates = (ttft * 1e3, b * (new_tokens - 1) / decode, b * new_tokens / total)
                runs.append(Run(_label(name, llm), b, *rates, *spec))
    return runs, rss_engine


def _speculation_counts(llm: LLMEngine) -> tuple[int, int, int]:
    spec = llm.speculator
    return (0, 0, 0) if spec is None else (spec.num_draft_tokens, spec.num_accepted_tokens, spec.num_verifications)


def _label(name: str, llm: LLMEngine) -> str:
    """What a run measured: the backend, and speculative decoding when the engine does it."""
    backend = "eager" if name == "eager" else llm.engine.backend
    if llm.speculator is not None:
        return f"{backend}, speculative k={llm.speculator.config.num_speculative_tokens}"
    return backend + (", speculation off" if name == "no-spec" else "")


def bench_offline(
    engine_dir: Path,
    batches: tuple[int, ...] = (1, 16),
    prompt_len: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    compare_eager: bool = False,
    cuda_graphs: bool | None = None,
    speculative: bool | SpeculativeSection = True,
    compare_speculative: bool = False,
    workload: str = "random",
    draft_engine: Path | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Measure an engine; returns a JSON-able report (see `format_markdown`). `cuda_graphs` overrides a
    cuda engine's own setting; `speculative`, `draft_engine` and `backend` (None: the engine's) are
    LLMEngine's. `compare_eager` also runs the exported program, `compare_speculative` the engine without
    speculative decoding, in the same process, rounds interleaved."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)} (got {workload!r})")
    # no prefix caching: a repeated prompt must be prefilled again, or TTFT would measure the cache
    start = time.perf_counter()
    engines = {
        "engine": LLMEngine.from_dir(
            engine_dir,
            backend=backend,
            enable_prefix_caching=False,
            cuda_graphs=cuda_graphs,
            speculative=speculative,
            draft_engine=draft_engine,
        )
    }
    load_s = time.perf_counter() - start
    try:
        if compare_eager or compare_speculative:
            if engines["engine"].engine.manifest.target.tensor_parallel > 1:
                raise ValueError("comparisons need a single-rank engine: one process runs one tensor-parallel engine")
        if compare_eager:
            engines["eager"] = LLMEngine.from_dir(
                engine_dir,
                backend="eager",
                verify=False,
                enable_prefix_caching=False,
                speculative=speculative,
                draft_engine=draft_engine,
            )
        if compare_speculative:
            engines["no-spec"] = LLMEngine.from_dir(
                engine_dir, verify=False, enable_prefix_caching=False, cuda_graphs=cuda_graphs, speculative=False
            )
        runs, rss_engine = _measure(engines, engine_dir, batches, prompt_len, new_tokens, repeats, workload)
    finally:
        for llm in engines.values():
            llm.close()
    engine = engines["engine"].engine
    manifest = engine.manifest
    bandwidth = read_bandwidth_gbs(engine.device)
    gpu = {}
    if engine.device.type == "cuda":
        gpu = {
            "gpu": torch.cuda.get_device_name(engine.device),
            "cuda_graphs": engines["engine"].runner.decode_graphs is not None,
            "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated(engine.device) / 2**20),
        }
    read_per_token = sum(
        t.numel() * t.element_size()
        for name, t in engine.graph.weights.items()
        if "embed" not in name or manifest.model.tie_word_embeddings
    )
    return {
        "llmbuild": llmbuild.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cpu": cpu_model(),
        "cpu_isa_flags": sorted(cpu_flags() & known_flags()),
        # set to keep a wider CPU to a narrower ISA (bench/results: AVX2 runs on AVX-512 machines)
        "isa_limits": {k: v for k in ISA_LIMIT_VARS if (v := os.environ.get(k))},
        "engine": str(engine_dir),
        "target_cpu": manifest.target.cpu,
        "kernel_isa": compiled_isas()[0],
        "load_s": round(load_s, 2),
        "name": manifest.name,
        "backend": engine.backend,
        "dtype": manifest.dtype,
        "params": manifest.model.num_params,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "workload": workload,
        "read_bandwidth_gbs": round(bandwidth, 1),
        "weight_bytes_read_per_token": read_per_token,
        "decode_ceiling_tok_s": round(bandwidth * 1e9 / read_per_token, 1),
        "peak_rss_mib": {"engine": round(rss_engine), "process": round(peak_rss_mib())},
        **gpu,
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs),
    }


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """min / median per (backend, batch); min for times, max-as-best for rates."""
    rows = []
    for key in sorted({(r.backend, r.batch) for r in runs}):
        group = [r for r in runs if (r.backend, r.batch) == key]
        rows.append(
            {
                "backend": key[0],
                "batch": key[1],
                "ttft_ms_min": round(min(r.ttft_ms for r in group), 1),
                "ttft_ms_median": round(statistics.median(r.ttft_ms for r in group), 1),
                "decode_tok_s_best": round(max(r.decode_tok_s for r in group), 2),
                "decode_tok_s_median": round(statistics.median(r.decode_tok_s for r in group), 2),
                "total_tok_s_best": round(max(r.total_tok_s for r in group), 2),
                "total_tok_s_median": round(statistics.median(r.total_tok_s for r in group), 2),
                **_acceptance(group),
            }
        )
    return rows


def _acceptance(runs: list[Run]) -> dict[str, float]:
    """Speculative decoding's acceptance rate (accepted / proposed) and mean accepted length (tokens kept per
    verification), over `runs`; empty without speculation."""
    drafted, accepted, checks = (
        sum(getattr(r, f) for r in runs) for f in ("draft_tokens", "accepted_tokens", "verifications")
    )
    if not drafted:
        return {}
    return {"acceptance_rate": round(accepted / drafted, 3), "mean_accepted_len": round(accepted / checks, 2)}


def format_markdown(report: dict[str, Any]) -> str:
    """The summary table of a report as markdown."""
    lines = [
        f"engine `{report['name']}` ({report['dtype']}, {report['params'] / 1e9:.2f}B params), "
        f"prompt {report['prompt_len']} ({report.get('workload', 'random')}), {report['new_tokens']} new tokens, "
        f"greedy, {report['repeats']} repeats; "
        f"{report['machine']}; torch {report['torch']}",
        "",
        f"CPU {report['cpu']}; engine target.cpu {report['target_cpu']}, kernels {report['kernel_isa']}"
        + (f", torch kernels capped by {report['isa_limits']}" if report["isa_limits"] else "")
        + f"; loaded in {report['load_s']} s",
        "",
        f"CPU flags: {' '.join(report['cpu_isa_flags'])}",
        "",
        f"read bandwidth {report['read_bandwidth_gbs']} GB/s, {report['weight_bytes_read_per_token'] / 1e9:.3f} GB "
        f"of weights per token: batch-1 decode ceiling {report['decode_ceiling_tok_s']} tok/s; peak RSS "
        f"{report['peak_rss_mib']['engine']} MiB (engine alone), {report['peak_rss_mib']['process']} MiB (process)",
    ]
    if "gpu" in report:
        graphs = "on" if report["cuda_graphs"] else "off"
        lines += ["", f"GPU {report['gpu']}, CUDA graphs {graphs}, peak GPU memory {report['peak_gpu_memory_mib']} MiB"]
    lines += [
        "",
        "| backend | batch | TTFT ms (min / med) | decode tok/s (best / med) | total tok/s (best / med) "
        "| accepted (rate, mean length) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        accepted = f"{r['acceptance_rate']:.0%}, {r['mean_accepted_len']:.2f}" if "acceptance_rate" in r else "-"
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['ttft_ms_min']:.0f} / {r['ttft_ms_median']:.0f} | "
            f"{r['decode_tok_s_best']:.1f} / {r['decode_tok_s_median']:.1f} | "
            f"{r['total_tok_s_best']:.1f} / {r['total_tok_s_median']:.1f} | {accepted} |"
        )
    return "\n".join(lines) + "\n"

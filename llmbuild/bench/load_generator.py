"""`llmbuild bench serve`: a closed-loop load generator for any OpenAI-compatible completions server.

N clients each send streaming /v1/completions requests back to back until M requests are done.
Prompts are random token ids (unique per request, so no prefix cache helps), greedy, EOS ignored,
so every request has exactly prompt_len input and max_tokens output tokens. The server streams one
chunk per token, so TTFT is the time to the first chunk and the gaps between chunks are the
inter-token latencies. When the server is llmbuild, its /metrics split engine step time into the
forward pass and the rest (scheduling, batch preparation, detokenization, delivery).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    e2e_s: float
    itl_s: list[float]
    output_tokens: int

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.e2e_s - self.ttft_s) / max(self.output_tokens - 1, 1)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50 / p90 / p99 / mean of values (seconds), in milliseconds by default."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * scale

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered) * scale}


async def _one(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> RequestTiming:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    if not stamps:
        raise RuntimeError("the server streamed no tokens")
    tokens = usage["completion_tokens"] if usage else len(stamps)
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return RequestTiming(stamps[0] - start, stamps[-1] - start, itl, tokens)


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The llmbuild counters this report uses (empty for servers that are not llmbuild)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    if r.status_code != 200:
        return {}
    wanted = ("llmbuild_step_time_seconds_total", "llmbuild_model_time_seconds_total", "llmbuild_step_seconds_count")
    out = {}
    for line in r.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


async def run_load(
    url: str,
    concurrency: int,
    num_requests: int,
    prompt_len: int,
    max_tokens: int,
    api_key: str | None = None,
    model: str | None = None,
    seed: int = 0,
    token_range: tuple[int, int] = (3, 500),
) -> dict[str, Any]:
    """Drive the server at `url` and return the report (latency percentiles in ms, throughputs)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    prompts = [[rng.randrange(*token_range) for _ in range(prompt_len)] for _ in range(num_requests)]
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=600, limits=limits) as client:
        if model is None:
            r = await client.get("/v1/models")
            if r.status_code != 200:
                raise RuntimeError(f"GET /v1/models: server answered {r.status_code}: {r.text[:300]}")
            model = r.json()["data"][0]["id"]
        await _one(client, model, prompts[0][:8], 2)  # warm-up: first-request costs stay out of the numbers
        before = await _metrics(client)
        queue = list(reversed(prompts))
        timings: list[RequestTiming] = []

        async def worker() -> None:
            while queue:
                timings.append(await _one(client, model, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = await _metrics(client)
    out_tokens = sum(t.output_tokens for t in timings)
    report: dict[str, Any] = {
        "url": url,
        "model": model,
        "concurrency": concurrency,
        "requests": num_requests,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "wall_s": wall,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + prompt_len * num_requests) / wall,
        "requests_per_s": num_requests / wall,
        "ttft_ms": percentiles([t.ttft_s for t in timings]),
        "tpot_ms": percentiles([t.tpot_s for t in timings]),
        "itl_ms": percentiles([x for t in timings for x in t.itl_s]),
        "e2e_ms": percentiles([t.e2e_s for t in timings]),
    }
    if before and after:
        step = after["llmbuild_step_time_seconds_total"] - before["llmbuild_step_time_seconds_total"]
        model_s = after["llmbuild_model_time_seconds_total"] - before["llmbuild_model_time_seconds_total"]
        steps = after["llmbuild_step_seconds_count"] - before["llmbuild_step_seconds_count"]
        if step > 0 and steps > 0:
            report["server"] = {
                "steps": int(steps),
                "mean_step_ms": 1000 * step / steps,
                "engine_busy_fraction": step / wall,
                "step_overhead_fraction": 1 - model_s / step,
            }
    return report


def format_report(report: dict[str, Any]) -> str:
    """Markdown summary of one run_load report."""
    r = report
    lines = [
        f"`{r['model']}` at {r['url']}: {r['requests']} requests, {r['concurrency']} concurrent, "
        f"prompt {r['prompt_len']}, {r['max_tokens']} new tokens, greedy",
        "",
        f"output {r['output_tok_s']:.1f} tok/s, total (in + out) {r['total_tok_s']:.1f} tok/s, "
        f"{r['requests_per_s']:.2f} req/s, wall {r['wall_s']:.1f} s",
        "",
        "| latency ms | p50 | p90 | p99 | mean |",
        "|---|---|---|---|---|",
    ]
    for key, label in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "end-to-end")]:
        p = r[key]
        lines.append(f"| {label} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} | {p['mean']:.1f} |")
    if "server" in r:
        s = r["server"]
        lines += [
            "",
            f"server: {s['steps']} steps, mean {s['mean_step_ms']:.1f} ms, engine busy "
            f"{100 * s['engine_busy_fraction']:.0f}% of wall time, step overhead (scheduling, inputs, "
            f"detokenize, delivery) {100 * s['step_overhead_fraction']:.1f}% of step time",
        ]
    return "\n".join(lines) + "\n"


def as_json(report: dict[str, Any]) -> str:
    """A run_load report as indented JSON, newline-terminated."""
    return json.dumps(report, indent=1) + "\n"

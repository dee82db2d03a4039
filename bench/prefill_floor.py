#!/usr/bin/env python3
"""How fast can a 128-token bf16 prefill of the TinyLlama shape be on this CPU? (issue 3's TTFT target)

    python bench/prefill_floor.py --out bench/results/prefill-floor

Measures, in one process with the benchmark's thread count:
- the machine's peak for the prefill's arithmetic: a register-only loop of vdpbf16ps (12 independent
  chains per thread) where the CPU has AVX512-BF16, else of 256-bit fp32 FMAs (AVX2: bf16 prefill runs
  its GEMMs in fp32 there, plugins/csrc/dequantize_gemm.h);
- aten's GEMM on the prefill's projection shapes (M = prompt tokens) in that dtype;
and prints the FLOPs of the prefill's projections and the TTFT floor they imply at each rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from llmbuild.machine import cpu_model

PEAK_SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

// What peak() measures: AVX512-BF16 dot products where this CPU has them, else AVX2 fp32 FMAs.
std::string peak_kind() {
#if defined(__AVX512BF16__)
  return "AVX512-BF16 vdpbf16ps";
#else
  return "AVX2 fp32 vfmadd";
#endif
}

// GFLOP/s of the peak loop over all OpenMP threads (12 independent accumulator chains per thread).
double peak(int64_t iters) {
  float sink = 0.f;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
#if defined(__AVX512BF16__)
    constexpr int flops = 64;  // 32 multiply-adds per instruction
    __m512 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_ps(acc[i]);
#else
    constexpr int flops = 16;  // 8 multiply-adds per instruction
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_setzero_ps();
    const __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(1e-9f);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
    alignas(32) float lanes[8];
    for (int i = 0; i < 12; ++i) {
      _mm256_store_ps(lanes, acc[i]);
      sink += lanes[0];
    }
#endif
  }
  const double seconds = omp_get_wtime() - t0;
  return static_cast<double>(iters) * 12 * flops * omp_get_max_threads() / seconds / 1e9 + (sink < 0 ? 1e-9 : 0);
}
"""

# hidden 2048, 32 heads x 64, 4 kv heads, ffn 5632, 22 layers: (N, K) of each projection, per layer
LAYER_SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]
LAYERS = 22


def best_seconds(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ext = load_inline(
        "llmbuild_prefill_peak",
        cpp_sources=PEAK_SRC,
        functions=["peak", "peak_kind"],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    peaks = sorted((ext.peak(20_000_000) for _ in range(args.repeats)), reverse=True)
    dtype = torch.bfloat16 if "BF16" in ext.peak_kind() else torch.float32
    m = args.tokens
    gemms = []
    for n, k in LAYER_SHAPES:
        x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        times = best_seconds(lambda x=x, w=w: torch.nn.functional.linear(x, w), args.repeats)
        gemms.append({"shape": [m, n, k], "gflops_best": 2 * m * n * k / times[0] / 1e9, "seconds": times})
    flops = 2 * m * LAYERS * sum(n * k for n, k in LAYER_SHAPES)
    layer_seconds = LAYERS * sum(g["seconds"][0] for g in gemms)
    report = {
        "threads": torch.get_num_threads(),
        "tokens": m,
        "peak_kind": ext.peak_kind(),
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "peak_gflops": [round(p, 1) for p in peaks],
        "gemms": [{**g, "gflops_best": round(g["gflops_best"], 1), "seconds": None} for g in gemms],
        "projection_gflop": round(flops / 1e9, 1),
        "floor_ms_at_peak": round(flops / (peaks[0] * 1e9) * 1e3, 1),
        "aten_projections_ms": round(layer_seconds * 1e3, 1),
    }
    lines = [
        f"{m}-token bf16 prefill of the TinyLlama shape, {report['threads']} threads, torch {torch.__version__}, "
        f"{cpu_model()}",
        "",
        f"- {report['peak_kind']} peak (register-only loop, best of {args.repeats}): {report['peak_gflops'][0]} "
        f"GFLOP/s (all: {report['peak_gflops']})",
        f"- projections (22 layers, lm_head excluded: one row): {report['projection_gflop']} GFLOP -> "
        f"floor {report['floor_ms_at_peak']} ms at peak",
        f"- aten {report['gemm_dtype']} GEMMs on those shapes, best of {args.repeats}: "
        f"{report['aten_projections_ms']} ms",
        "",
        "| M x N x K | aten GFLOP/s (best) |",
        "|---|---|",
        *(f"| {' x '.join(map(str, g['shape']))} | {g['gflops_best']} |" for g in report["gemms"]),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

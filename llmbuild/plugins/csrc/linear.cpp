// linear: y = x @ w.T (+ bias), the projection op of every model graph.
//
// Decode steps multiply a handful of token rows by each weight matrix, which makes them a pure
// stream over the weights: aten's bf16 path reaches about half the memory bandwidth there. For
// bf16 with at most kSmallM* rows this runs a kernel that reads every weight row once from memory and
// keeps fp32 accumulators in registers; with more than 4 rows, a panel of weight rows stays in cache
// while each 4-row tile of x passes over it. bf16 products are exact in fp32, so the tiers differ only in
// summation order:
//   avx512 (BF16)  vdpbf16ps, 32 products per instruction.
//   avx2           bf16 -> fp32 by shifts: a 32-bit lane holding elements (2j, 2j+1) gives element 2j+1
//                  by masking its low half and element 2j by shifting left 16; x is split into its even
//                  and odd elements once per call, so each weight vector costs two ALU ops and two FMAs.
//                  From kWideRows rows on, panels of weight rows are widened once into a buffer and
//                  multiplied from there by 4 x 3 register tiles (wide_gemm).
// Anything else (fp32, prefill-sized batches, the portable tier) goes to aten, i.e. oneDNN, which is
// faster once the GEMM is compute-bound; bf16 prefill below AVX512-BF16 widens panels of the weight to fp32
// first (dequantize_gemm.h: aten's bf16 GEMM is an emulation there).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>


#include "dequantize_gemm.h"
#include "isa.h"
#include "ops.h"

namespace llmbuild {
namespace {

// Rows of x up to which the decode kernel runs. AVX512-BF16 (2-core machine, TinyLlama shapes, one layer +
// lm_head): 1.37x aten at M=4; with its tile in registers (isa.h dpbf16) 1.06-1.12x aten at M = 9..16
// (7.4 / 7.9 / 9.2 ms against 8.1 / 8.9 / 9.8 ms at M = 9 / 12 / 16). AVX2: the widened tiles (wide_gemm) against
// aten's fp32 GEMM on weights widened panel by panel, one layer + lm_head, x86-64-v3 build, torch kept to AVX2, 2
// cores of an AMD EPYC: 1.45x at M = 17, 1.28x at 32, 1.10-1.13x at 64, 1.00-1.03x at 96, 0.96x at 128. A CPU with
// AVX-512 but not its BF16 (an x86-64-v4 build) runs the AVX2 tiles only up to kSmallMAvx512 rows: against aten's
// AVX-512 GEMM on a CPU with full-width 512-bit units they are not measured.
constexpr int64_t kSmallMAvx512 = 16;
constexpr int64_t kSmallMAvx2 = 64;

// Weight rows per panel when x has more than 4 rows and the widened tiles do not run (a few tens of KB).
constexpr int64_t kPanel = 16;

// Bytes ahead of the current position of each weight row to prefetch.
constexpr int64_t kPrefetch = 4096;

struct Args {
  const c10::BFloat16* w;
  const c10::BFloat16* bias;
  c10::BFloat16* y;
  int64_t K, N;
};

inline void finish(const Args& p, int64_t m, int64_t n, float dot) {
  p.y[m * p.N + n] = c10::BFloat16(dot + (p.bias ? static_cast<float>(p.bias[n]) : 0.f));
}

// Runs rows<M>(x rows [m, m + M), weight rows [n0, n1)) over the whole output: for M <= 4 one register
// tile of x over all weight rows; above, panels of weight rows meet every 4-row tile of x.
template <class Rows>
void for_each_block(int64_t M, int64_t N, int64_t grain_rows, Rows&& rows) {
  if (M <= 4) {
    at::parallel_for(0, N, grain_rows, [&](int64_t n0, int64_t n1) { rows(0, M, n0, n1); });
    return;
  }
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 2, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, n1 = std::min(n0 + kPanel, N);
      for (int64_t m = 0; m < M; m += 4) rows(m, std::min<int64_t>(4, M - m), n0, n1);
    }
  });
}

#if defined(LLMBUILD_AVX2)
namespace avx2 {

// x rows as fp32, split into even and odd elements of their first k_vec = K / 16 * 16 columns: [M][2][k_vec / 2],
// i.e. rows of k_vec floats. (A tensor: aligned to 64 bytes, so that no 32-byte load straddles a cache line.)
at::Tensor split_even_odd(const c10::BFloat16* x, int64_t M, int64_t K) {
  const int64_t half = K / 16 * 8;
  at::Tensor tensor = at::empty({M * 2 * half}, at::kFloat);
  float* out = tensor.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < half; ++j) {
      out[(2 * m) * half + j] = static_cast<float>(x[m * K + 2 * j]);
      out[(2 * m + 1) * half + j] = static_cast<float>(x[m * K + 2 * j + 1]);
    }
  }
  return tensor;
}

// Output rows [n0, n1) for x rows [m0, m0 + M), ROWS weight rows at a time, even and odd accumulators.
// U vectors of 16 weights per iteration, each with accumulators of its own: a lone weight row (M x ROWS
// of 1 or 2) would otherwise wait on the FMA latency, not on memory.
template <int M, int ROWS>
void rows(const Args& p, const c10::BFloat16* x, const float* xs, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int U = M * ROWS == 1 ? 4 : M * ROWS == 2 ? 2 : 1;
  const int64_t K = p.K, k_vec = K / 16 * 16, k_main = K / (16 * U) * (16 * U), half = k_vec / 2;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m256 even[U][ROWS][M], odd[U][ROWS][M];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < M; ++m) even[u][r][m] = odd[u][r][m] = _mm256_setzero_ps();
    // one vector of 16 weights of row r at column k into the accumulators of slot u
    auto fma16 = [&](int u, int r, int64_t k) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w + (n + r) * K + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int m = 0; m < M; ++m) {
        const float* xm = xs + 2 * (m0 + m) * half + k / 2;
        even[u][r][m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xm), even[u][r][m]);
        odd[u][r][m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xm + half), odd[u][r][m]);
      }
    };
    for (int64_t k = 0; k < k_main; k += 16 * U) {
      for (int r = 0; r < ROWS; ++r)
        for (int64_t line = 0; line < 32 * U; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p.w + (n + r) * K + k) + line + kPrefetch, _MM_HINT_T0);
      for (int u = 0; u < U; ++u)
        for (int r = 0; r < ROWS; ++r) fma16(u, r, k + 16 * u);
    }
    for (int64_t k = k_main; k < k_vec; k += 16)
      for (int r = 0; r < ROWS; ++r) fma16(0, r, k);
    for (int r = 0; r < ROWS; ++r) {
      for (int m = 0; m < M; ++m) {
        __m256 sum = _mm256_add_ps(even[0][r][m], odd[0][r][m]);
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, _mm256_add_ps(even[u][r][m], odd[u][r][m]));
        float dot = hsum(sum);
        for (int64_t k = k_vec; k < K; ++k)
          dot += static_cast<float>(x[(m0 + m) * K + k]) * static_cast<float>(p.w[(n + r) * K + k]);
        finish(p, m0 + m, n + r, dot);
      }
    }
  }
  if (n < n1) rows<M, 1>(p, x, xs, m0, n, n1);
}

// From kWideRows rows of x on, every weight is used by enough rows that widening it once pays: a panel of
// kWidePanel weight rows is widened to fp32 (in the even/odd order of xs) into a buffer of the thread, then
// 4 x 3 register tiles multiply it with x from the cache. The thread's next panel is prefetched across the
// current one's tiles: read on demand, it arrived in one burst per panel and the cores waited on memory.
// (x86-64-v3 build, 2 AMD EPYC cores, TinyLlama shapes at M = 16: 197-206 GFLOP/s against 134-180 for the
// panels of rows<4, 1> below; without the prefetch ~160 in a standalone test. At M = 6 the widening does not
// pay yet: 9.1-9.4 against 8.5 ms; M = 7 9.1-9.3 against 9.4-9.6 ms; bench/results/kernel-tiers-bf16-avx2.md.)
constexpr int64_t kWideRows = 7;
constexpr int64_t kWidePanel = 12;

// Widens rows [0, rows) of w (row stride K) into wf ([rows][k_vec], even elements then odd ones per row).
void widen_rows(const c10::BFloat16* w, int64_t K, int64_t k_vec, int64_t rows, float* wf) {
  const int64_t half = k_vec / 2;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t r = 0; r < rows; ++r) {
    float* out = wf + r * k_vec;
    for (int64_t k = 0; k < k_vec; k += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      _mm256_storeu_ps(out + k / 2, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      _mm256_storeu_ps(out + half + k / 2, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
    }
  }
}

// Output rows [n, n + NR) for x rows [m0, m0 + MR) from widened rows wf; prefetches the bytes [pf, pf_end) of
// `next` on the way, a cache line every pf_mask + 1 vectors.
// The empty asm statements pin each loaded vector to a register: GCC 12 otherwise folds the loads into the FMAs
// as memory operands, reading each weight MR times and each x NR times (with -march=znver4: 24 loads per 12
// FMAs, 90 against 190 GFLOP/s). Not inlined: inside its caller the same tile spilled to the stack.
template <int MR, int NR>
__attribute__((noinline)) void wide_tile(const Args& p, const c10::BFloat16* x, const float* xs, const float* wf,
                                         int64_t m0, int64_t n, const char* next, int64_t pf, int64_t pf_end,
                                         int64_t pf_mask) {
  const int64_t K = p.K, k_vec = K / 16 * 16;
  // (every loop over the tile unrolled, so that it lives in registers: 12 accumulators, 3 weights, 1 x)
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t j = 0, i = 0; j < k_vec; j += 8, ++i) {
    if (pf < pf_end && (i & pf_mask) == 0) {
      __builtin_prefetch(next + pf);
      pf += 64;
    }
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      wv[r] = _mm256_loadu_ps(wf + r * k_vec + j);
      asm("" : "+x"(wv[r]));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      __m256 xv = _mm256_loadu_ps(xs + (m0 + m) * k_vec + j);
      asm("" : "+x"(xv));
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  // (reduced in unrolled loops: an accumulator indexed at run time would live on the stack)
  float dots[MR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) dots[m][r] = hsum(acc[m][r]);
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < NR; ++r) {
      float dot = dots[m][r];
      for (int64_t k = k_vec; k < K; ++k)
        dot += static_cast<float>(x[(m0 + m) * K + k]) * static_cast<float>(p.w[(n + r) * K + k]);
      finish(p, m0 + m, n + r, dot);
    }
  }
}

template <int NR>
void wide_tile_rows(const Args& p, const c10::BFloat16* x, const float* xs, const float* wf, int64_t m0, int64_t mr,
                    int64_t n, const char* next, int64_t pf, int64_t pf_end, int64_t pf_mask) {
  switch (mr) {
    case 1: wide_tile<1, NR>(p, x, xs, wf, m0, n, next, pf, pf_end, pf_mask); break;
    case 2: wide_tile<2, NR>(p, x, xs, wf, m0, n, next, pf, pf_end, pf_mask); break;
    case 3: wide_tile<3, NR>(p, x, xs, wf, m0, n, next, pf, pf_end, pf_mask); break;
    default: wide_tile<4, NR>(p, x, xs, wf, m0, n, next, pf, pf_end, pf_mask); break;
  }
}

void wide_gemm(const Args& p, const c10::BFloat16* x, const float* xs, int64_t M) {
  const int64_t K = p.K, k_vec = K / 16 * 16, panels = (p.N + kWidePanel - 1) / kWidePanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    const at::Tensor buffer = at::empty({kWidePanel * k_vec}, at::kFloat);  // (64-byte aligned, as x_split)
    float* wf = buffer.data_ptr<float>();
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t n0 = panel * kWidePanel, n1 = std::min(n0 + kWidePanel, p.N);
      widen_rows(p.w + n0 * K, K, k_vec, n1 - n0, wf);
      // the thread's next panel, a share per tile
      const int64_t next_rows = panel + 1 < p1 ? std::min(kWidePanel, p.N - n1) : 0;
      const char* next = reinterpret_cast<const char*>(p.w + n1 * K);
      const int64_t bytes = next_rows * K * 2, lines = (bytes + 63) / 64;
      const int64_t tiles = (M + 3) / 4 * ((n1 - n0 + 2) / 3);
      const int64_t share = (lines + tiles - 1) / tiles;
      int64_t mask = 0;  // a line every 2^j vectors, as sparse as still covers the share
      while (share > 0 && (mask + 1) * 2 * share <= k_vec / 8) mask = mask * 2 + 1;
      int64_t tile = 0;
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t mr = std::min<int64_t>(4, M - m);
        for (int64_t n = n0; n < n1; n += 3, ++tile) {
          const int64_t pf = std::min(bytes, tile * share * 64), pf_end = std::min(bytes, (tile + 1) * share * 64);
          const float* wn = wf + (n - n0) * k_vec;
          switch (std::min<int64_t>(3, n1 - n)) {
            case 1: wide_tile_rows<1>(p, x, xs, wn, m, mr, n, next, pf, pf_end, mask); break;
            case 2: wide_tile_rows<2>(p, x, xs, wn, m, mr, n, next, pf, pf_end, mask); break;
            default: wide_tile_rows<3>(p, x, xs, wn, m, mr, n, next, pf, pf_end, mask); break;
          }
        }
      }
    }
  });
}

void gemv(const Args& p, const c10::BFloat16* x, int64_t M) {
  const at::Tensor x_split = split_even_odd(x, M, p.K);
  const float* xs = x_split.data_ptr<float>();
  if (M >= kWideRows) {
    wide_gemm(p, x, xs, M);
    return;
  }
  for_each_block(M, p.N, 8, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    switch (mt) {
      // one weight row at a time at batch 1: a single sequential stream through memory
      case 1: rows<1, 1>(p, x, xs, m0, n0, n1); break;
      // (2 x 2 measured 1.75x slower at M = 2 in an x86-64-v3 build: 16 ymm registers)
      case 2: rows<2, 1>(p, x, xs, m0, n0, n1); break;
      case 3: rows<3, 1>(p, x, xs, m0, n0, n1); break;
      default: rows<4, 1>(p, x, xs, m0, n0, n1); break;
    }
  });
}

}  // namespace avx2
#endif

#if defined(LLMBUILD_AVX512) && defined(__AVX512BF16__)
#define LLMBUILD_LINEAR_AVX512 1
namespace avx512 {

// x: [M, K] rows, w: [N, K] row-major, y: [M, N]. Rows [n0, n1) of w, x rows [m0, m0 + M). A lone
// weight row (M x ROWS = 1) alternates two accumulators, so that the dot products' latency does not bind.
template <int M, int ROWS>
void rows(const Args& p, const c10::BFloat16* x, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int U = M * ROWS == 1 ? 2 : 1;
  const int64_t K = p.K, k_main = K / 32 * 32, k_pairs = K / (32 * U) * (32 * U);
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k_main)) - 1);
  const c10::BFloat16* xr = x + m0 * K;
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    // (every loop over the tile unrolled, so that it lives in registers)
    __m512 acc[ROWS][M], extra = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const c10::BFloat16* wr = p.w + n * K;
    // 32 columns of every row (masked to `mask`) into acc (or, for the second of a pair with U = 2, into extra)
    auto dot32 = [&](int64_t k, bool second, __mmask32 mask) __attribute__((always_inline)) {
      __m512i xv[M];
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, xr + m * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + r * K + k) + kPrefetch, _MM_HINT_T0);
        const __m512i wv = _mm512_maskz_loadu_epi16(mask, wr + r * K + k);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) dpbf16(U == 2 && second ? extra : acc[r][m], wv, xv[m]);
      }
    };
    constexpr __mmask32 all = ~__mmask32{0};
    for (int64_t k = 0; k < k_pairs; k += 32 * U)
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) dot32(k + 32 * u, u == 1, all);
    for (int64_t k = k_pairs; k < k_main; k += 32) dot32(k, false, all);
    acc[0][0] = _mm512_add_ps(acc[0][0], extra);
    if (tail) dot32(k_main, false, tail);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) finish(p, m0 + m, n + r, _mm512_reduce_add_ps(acc[r][m]));
  }
  if (n < n1) rows<M, 1>(p, x, m0, n, n1);
}

void gemv(const Args& p, const c10::BFloat16* x, int64_t M) {
  // One x row reads one weight row at a time: a single sequential stream through memory. Several rows
  // at once (rows of 2048 bf16 lie 4 KiB apart, in the same L1 sets) measured 1.3x slower at batch 1
  // on the 2-core AVX512 machine; from 2 x rows on, compute binds and 4 rows x M accumulators win.
  for_each_block(M, p.N, 8, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    switch (mt) {
      case 1: rows<1, 1>(p, x, m0, n0, n1); break;
      case 2: rows<2, 4>(p, x, m0, n0, n1); break;
      case 3: rows<3, 4>(p, x, m0, n0, n1); break;
      default: rows<4, 4>(p, x, m0, n0, n1); break;
    }
  });
}

}  // namespace avx512
#endif

bool use_gemv(const at::Tensor& x2d, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t small_m = kernel_isa() == Isa::kAvx2 ? kSmallMAvx2 : kSmallMAvx512;
  return kernel_isa() >= Isa::kAvx2 && x2d.size(0) >= 1 && x2d.size(0) <= small_m &&
         x2d.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
         (!bias || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous()));
}

// Only called when use_gemv holds, which needs a vector tier.
at::Tensor run_gemv(const at::Tensor& x2d, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const auto x = x2d.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  [[maybe_unused]] const Args p{w.data_ptr<c10::BFloat16>(), bias ? bias->data_ptr<c10::BFloat16>() : nullptr,
               y.data_ptr<c10::BFloat16>(), w.size(1), w.size(0)};
  [[maybe_unused]] const auto* xp = x.data_ptr<c10::BFloat16>();
#if defined(LLMBUILD_LINEAR_AVX512)
  if (kernel_isa() == Isa::kAvx512) {
    avx512::gemv(p, xp, x.size(0));
    return y;
  }
#endif
#if defined(LLMBUILD_AVX2)
  avx2::gemv(p, xp, x.size(0));
#endif
  return y;
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "linear: x [..., ", x.size(-1), "] does not fit w ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: x dtype ", x.scalar_type(), " != w dtype ",
              w.scalar_type());
  const auto x2d = x.reshape({-1, x.size(-1)});
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.size(0);
  if (use_gemv(x2d, w, bias)) return run_gemv(x2d, w, bias).view(out_shape);
  if (x.scalar_type() == at::kBFloat16 && gemm_dtype(at::kBFloat16) == at::kFloat) {
    const auto wc = w.contiguous();
    const auto y = dequantize_gemm(x2d.contiguous(), w.size(0), bias, [&](int64_t n0, int64_t n1, at::Tensor& out) {
      out.copy_(wc.narrow(0, n0, n1 - n0));
    });
    return y.view(out_shape);
  }
  return at::linear(x, w, bias);
}

}  // namespace llmbuild

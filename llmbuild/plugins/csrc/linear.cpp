// linear: y = x @ w.T (+ bias), the projection op of every model graph.
//
// Decode steps multiply a handful of token rows by each weight matrix, which makes them a pure
// stream over the weights: aten's bf16 path reaches about half the memory bandwidth there. For
// bf16 with at most kSmallM rows this runs a kernel that reads every weight row once from memory,
// keeps ROWS x (up to 4) fp32 accumulators in registers and uses AVX512-BF16 dot products; with
// more than 4 rows, a panel of weight rows stays in cache while each 4-row tile of x passes over
// it. Anything else (fp32, prefill-sized batches) goes to aten, i.e. oneDNN, which is faster once
// the GEMM is compute-bound.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "ops.h"

namespace llmbuild {
namespace {

#if defined(__AVX512BF16__)

// x: [M, K] rows, w: [N, K] row-major, y: [M, N]. Rows [n0, n1) of w, all M rows of x.
template <int M, int ROWS>
void gemv_rows(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* y,
               int64_t n0, int64_t n1, int64_t K, int64_t N) {
  const int64_t k_main = K / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k_main)) - 1);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m512 acc[ROWS][M];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const c10::BFloat16* wr = w + n * K;
    for (int64_t k = 0; k <= K - 32; k += 32) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + r * K + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
    if (tail) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k_main);
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + r * K + k_main);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const float b = bias ? static_cast<float>(bias[n + r]) : 0.f;
      for (int m = 0; m < M; ++m) y[m * N + n + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][m]) + b);
    }
  }
  if (n < n1) gemv_rows<M, 1>(x, w, bias, y, n, n1, K, N);
}

template <int M>
void gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  // One x row reads one weight row at a time: a single sequential stream through memory. Several rows
  // at once (rows of 2048 bf16 lie 4 KiB apart, in the same L1 sets) measured 1.3x slower at batch 1
  // on the 2-core AVX512 machine; from 2 x rows on, compute binds and 4 rows x M accumulators win.
  constexpr int ROWS = M == 1 ? 1 : 4;
  const int64_t N = w.size(0), K = w.size(1);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const c10::BFloat16* bp = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  auto* yp = y.data_ptr<c10::BFloat16>();
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    gemv_rows<M, ROWS>(xp, wp, bp, yp, b0 * ROWS, std::min(b1 * ROWS, N), K, N);
  });
}

// M > 4: panels of kPanel weight rows (a few tens of KB, cache-resident) meet every 4-row tile of x.
void gemm_panels(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  constexpr int ROWS = 4;
  constexpr int64_t kPanel = 16;
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const c10::BFloat16* bp = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  auto* yp = y.data_ptr<c10::BFloat16>();
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 2, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, n1 = std::min(n0 + kPanel, N);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) gemv_rows<4, ROWS>(xp + m * K, wp, bp, yp + m * N, n0, n1, K, N);
      switch (M - m) {
        case 3: gemv_rows<3, ROWS>(xp + m * K, wp, bp, yp + m * N, n0, n1, K, N); break;
        case 2: gemv_rows<2, ROWS>(xp + m * K, wp, bp, yp + m * N, n0, n1, K, N); break;
        case 1: gemv_rows<1, ROWS>(xp + m * K, wp, bp, yp + m * N, n0, n1, K, N); break;
        default: break;
      }
    }
  });
}

// Measured on the 2-core AVX512-BF16 machine (TinyLlama shapes, one layer + lm_head): 1.37x aten at
// M=4, 1.23x at M=8, even at M=12..24, where both are compute-bound near 170 GFLOP/s.
constexpr int64_t kSmallM = 8;

bool use_gemv(const at::Tensor& x2d, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return x2d.size(0) >= 1 && x2d.size(0) <= kSmallM && x2d.scalar_type() == at::kBFloat16 &&
         w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
         (!bias || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous()));
}

at::Tensor run_gemv(const at::Tensor& x2d, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const auto x = x2d.contiguous();
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  switch (x.size(0)) {
    case 1: gemv<1>(x, w, bias, y); break;
    case 2: gemv<2>(x, w, bias, y); break;
    case 3: gemv<3>(x, w, bias, y); break;
    case 4: gemv<4>(x, w, bias, y); break;
    default: gemm_panels(x, w, bias, y); break;
  }
  return y;
}

#else

bool use_gemv(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&) { return false; }
at::Tensor run_gemv(const at::Tensor& x, const at::Tensor&, const c10::optional<at::Tensor>&) { return x; }

#endif

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "linear: x [..., ", x.size(-1), "] does not fit w ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: x dtype ", x.scalar_type(), " != w dtype ",
              w.scalar_type());
  const auto x2d = x.reshape({-1, x.size(-1)});
  if (!use_gemv(x2d, w, bias)) return at::linear(x, w, bias);
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.size(0);
  return run_gemv(x2d, w, bias).view(out_shape);
}

}  // namespace llmbuild

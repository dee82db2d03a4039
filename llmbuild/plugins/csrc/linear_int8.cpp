// linear_int8: y = x @ (w * scales[:, None]).T (+ bias), int8 weights with per-row scales.
//
// With AVX512-VNNI and up to kVnniM rows of x (decode), the weights are read once and multiplied as
// bytes against int8-quantized activations (vpdpbusd, 64 multiply-adds per instruction; vnni.h).
// vpdpbusd takes one operand unsigned: the kernel flips the weights' sign bit (w + 128 as a byte) and
// subtracts 128 x sum(activations) per row afterwards. Larger batches (prefill), other CPUs and K not
// a multiple of 32 dequantize cache-sized panels of the weight and run dense GEMMs (dequantize_gemm.h).
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#include "dequantize_gemm.h"
#include "ops.h"
#include "vnni.h"

namespace llmbuild {
namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// Rows of x up to which the VNNI kernel beats dequantize + dense GEMM (measured, TinyLlama shapes).
constexpr int64_t kVnniM = 16;

// Bytes ahead of the current block of each weight row to prefetch.
constexpr int64_t kPrefetch = 4096;

// Output rows [n0, n1) for x rows [m0, m0 + MT); ROWS weight rows at a time keep ROWS x MT
// independent accumulator chains in flight. Each 64 columns: one load per weight row, one vpdpbusd
// per x row, scaled per 4-column lane by the activation block's scale.
template <int MT, int ROWS, class T>
void int8_rows(const Int8Activations& a, int64_t m0, const int8_t* w, const T* scales, const T* bias, T* y,
               int64_t n0, int64_t n1, int64_t N) {
  const int64_t K = a.K;
  const int8_t* xrow[MT];
  const float* xlanes[MT];
  float xsum[MT];
  for (int m = 0; m < MT; ++m) {
    xrow[m] = a.row(m0 + m);
    xlanes[m] = a.lanes(m0 + m);
    xsum[m] = 128.f * a.sums(m0 + m)[0];
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m512 acc[ROWS][MT];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
      // a last block of 32 columns: the masked-off bytes flip to 128, met by zero-padded activations
      const __mmask64 bytes = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
      __m512i xv[MT];
      __m512 sv[MT];
      for (int m = 0; m < MT; ++m) {
        xv[m] = _mm512_loadu_si512(xrow[m] + k);
        sv[m] = _mm512_loadu_ps(xlanes[m] + k / 4);
      }
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* wr = w + (n + r) * K + k;
        // the hardware prefetcher alone leaves this loop waiting on memory
        _mm_prefetch(reinterpret_cast<const char*>(wr) + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, wr), flip);
        for (int m = 0; m < MT; ++m) {
          const __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), v, xv[m]));
          acc[r][m] = _mm512_fmadd_ps(d, sv[m], acc[r][m]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const float s = static_cast<float>(scales[n + r]);
      const float b = bias ? static_cast<float>(bias[n + r]) : 0.f;
      for (int m = 0; m < MT; ++m) store(y + (m0 + m) * N + n + r, s * (_mm512_reduce_add_ps(acc[r][m]) - xsum[m]) + b);
    }
  }
  if (n < n1) int8_rows<MT, 1>(a, m0, w, scales, bias, y, n, n1, N);
}

template <class T>
void int8_vnni(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  // group K: the one group sum per row is sum(dequantized activations), the term the flip adds
  const Int8Activations a = quantize_activations(x2d, x2d.size(1), Order::kColumns);
  const auto* wp = w.data_ptr<int8_t>();
  const T* sp = scales.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t N = w.size(0);
  for_each_tile(a.M, N, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    switch (mt) {
      // one weight row at a time at batch 1: a sequential stream, 1.4x faster than 4 rows at once (measured)
      case 1: int8_rows<1, 1>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
      case 2: int8_rows<2, 4>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
      case 3: int8_rows<3, 2>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
      default: int8_rows<4, 2>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
    }
  });
}

bool use_vnni(const at::Tensor& x2d) { return x2d.size(0) <= kVnniM && x2d.size(1) % kActBlock == 0; }

#else

bool use_vnni(const at::Tensor&) { return false; }
template <class T>
void int8_vnni(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
               at::Tensor&) {}

#endif

// Rows [n0, n1) of w * scales into out [n1 - n0, K], split over threads.
template <class T>
void dequantize_rows(const at::Tensor& w, const at::Tensor& scales, int64_t n0, int64_t n1, at::Tensor& out) {
  const int64_t K = w.size(1);
  const auto* wp = w.data_ptr<int8_t>();
  const T* sp = scales.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const float s = static_cast<float>(sp[n]);
      const int8_t* wr = wp + n * K;
      T* o = op + (n - n0) * K;
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<T>(static_cast<float>(wr[k]) * s);
    }
  });
}

template <class T>
at::Tensor run(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias) {
  if (use_vnni(x2d)) {
    auto y = at::empty({x2d.size(0), w.size(0)}, x2d.options());
    int8_vnni<T>(x2d, w, scales, bias, y);
    return y;
  }
  return dequantize_gemm<T>(x2d, w.size(0), bias, [&](int64_t n0, int64_t n1, at::Tensor& out) {
    dequantize_rows<T>(w, scales, n0, n1, out);
  });
}

}  // namespace

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "linear_int8: w must be int8 [N, K], got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "linear_int8: x [..., ", x.size(-1), "] does not fit w ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear_int8: x must be bf16 or fp32, got ", x.scalar_type());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) && scales.scalar_type() == x.scalar_type(),
              "linear_int8: scales must be [", w.size(0), "] in the activation dtype ", x.scalar_type());
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->numel() == w.size(0)),
              "linear_int8: bias must be [", w.size(0), "] in x's dtype");
  const auto x2d = x.reshape({-1, x.size(-1)}).contiguous();
  const auto wc = w.contiguous(), sc = scales.contiguous();
  const c10::optional<at::Tensor> bc = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const at::Tensor y = x.scalar_type() == at::kFloat ? run<float>(x2d, wc, sc, bc) : run<c10::BFloat16>(x2d, wc, sc, bc);
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.size(0);
  return y.view(out_shape);
}

}  // namespace llmbuild

// linear_int8: y = x @ (w * scales[:, None]).T (+ bias), int8 weights with per-row scales.
//
// Up to kQuantM rows of x (decode) with K a multiple of 32: the weights are read once and multiplied as
// bytes against int8-quantized activations (int8_activations.h), in every tier the same exact 32-column
// integer dot products, each scaled by its activation block's scale in fp32:
//   avx512 (VNNI) vpdpbusd takes one operand unsigned: the weights' sign bit is flipped (w + 128 as a
//                 byte) and 128 x sum(activations) is subtracted per row afterwards.
//   avx2          vpmaddubsw of |w| and x * sign(w), then vpmaddwd to int32 (llama.cpp's Q8_0 x Q8_0).
//   portable      the same sums in plain C++.
// Larger batches (prefill) and K not a multiple of 32 dequantize cache-sized panels of the weight and run
// dense GEMMs (dequantize_gemm.h).
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "dequantize_gemm.h"
#include "int8_activations.h"
#include "isa.h"
#include "ops.h"

namespace llmbuild {
namespace {

// Rows of x up to which the quantized kernels beat dequantize + dense GEMM (measured, TinyLlama shapes,
// AVX512-VNNI). The same bound in every tier keeps the numerics of a batch independent of the tier.
constexpr int64_t kQuantM = 16;

// Bytes ahead of the current block of each weight row to prefetch (the hardware prefetcher alone leaves
// the decode loops waiting on memory).
constexpr int64_t kPrefetch = 4096;

struct Args {
  const Int8Activations& a;
  const int8_t* w;
  int64_t N;
};

template <class T>
void finish(T* y, float dot, float scale, const T* bias, int64_t n) {
  store(y + n, scale * dot + (bias ? static_cast<float>(bias[n]) : 0.f));
}

namespace portable {

template <class T>
void tile(const Args& p, const T* scales, const T* bias, T* y, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  const int64_t K = p.a.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = p.w + n * K;
    for (int64_t m = m0; m < m0 + mt; ++m) {
      const int8_t* xr = p.a.row(m);
      const float* lanes = p.a.lanes(m);
      float acc = 0.f;
      for (int64_t k = 0; k < K; k += kActBlock) {
        int32_t dot = 0;
        for (int64_t i = 0; i < kActBlock; ++i) dot += static_cast<int32_t>(xr[k + i]) * wr[k + i];
        acc += static_cast<float>(dot) * lanes[k / 4];
      }
      finish(y + m * p.N, acc, static_cast<float>(scales[n]), bias, n);
    }
  }
}

}  // namespace portable

#if defined(LLMBUILD_AVX2)
namespace avx2 {

// Output rows [n0, n1) for x rows [m0, m0 + MT), ROWS weight rows at a time. Each 32 columns (one
// activation block): one load per weight row, vpmaddubsw + vpmaddwd per x row, one fma by the block scale.
template <int MT, int ROWS, class T>
void rows(const Args& p, const T* scales, const T* bias, T* y, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = p.a.K;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xrow[MT];
  const float* xlanes[MT];
  for (int m = 0; m < MT; ++m) {
    xrow[m] = p.a.row(m0 + m);
    xlanes[m] = p.a.lanes(m0 + m);
  }
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m256 acc[ROWS][MT];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += kActBlock) {
      __m256i xv[MT];
      __m256 dv[MT];
      for (int m = 0; m < MT; ++m) {
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow[m] + k));
        dv[m] = _mm256_broadcast_ss(xlanes[m] + k / 4);
      }
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* wr = p.w + (n + r) * K + k;
        _mm_prefetch(reinterpret_cast<const char*>(wr) + kPrefetch, _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
        const __m256i wabs = _mm256_sign_epi8(wv, wv);  // |w| <= 127: pair sums stay within int16
        for (int m = 0; m < MT; ++m) {
          const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv[m], wv)), ones);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dv[m], acc[r][m]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m) finish(y + (m0 + m) * p.N, hsum(acc[r][m]), static_cast<float>(scales[n + r]), bias, n + r);
  }
  if (n < n1) rows<MT, 1>(p, scales, bias, y, m0, n, n1);
}

template <class T>
void tile(const Args& p, const T* scales, const T* bias, T* y, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  switch (mt) {
    // one weight row at a time at batch 1: a single sequential stream through memory
    case 1: rows<1, 1>(p, scales, bias, y, m0, n0, n1); break;
    case 2: rows<2, 2>(p, scales, bias, y, m0, n0, n1); break;
    case 3: rows<3, 1>(p, scales, bias, y, m0, n0, n1); break;
    default: rows<4, 1>(p, scales, bias, y, m0, n0, n1); break;
  }
}

}  // namespace avx2
#endif

#if defined(LLMBUILD_AVX512) && defined(__AVX512VNNI__)
#define LLMBUILD_INT8_AVX512 1
namespace avx512 {

// Output rows [n0, n1) for x rows [m0, m0 + MT); ROWS weight rows at a time keep ROWS x MT
// independent accumulator chains in flight. Each 64 columns: one load per weight row, one vpdpbusd
// per x row, scaled per 4-column lane by the activation block's scale.
// NOTE: called as before the tiers existed (plain pointers and sizes, activations quantized in `run`, one
// switch per tile): the same loop reached through the other tiers' Args and shared tile lambda ran 20-25%
// slower at 16 rows inside an engine (3 interleaved rounds; the difference is in the generated code).
template <int MT, int ROWS, class T>
void rows(const Int8Activations& a, int64_t m0, const int8_t* w, const T* scales, const T* bias, T* y, int64_t n0,
          int64_t n1, int64_t N) {
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
  if (n < n1) rows<MT, 1>(a, m0, w, scales, bias, y, n, n1, N);
}

// y [M, N] from x2d [M, K] (K a multiple of 32).
template <class T>
void run(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
         at::Tensor& y) {
  // one group of K: its sum is what the sign flip adds
  const Int8Activations a = quantize_activations(x2d, x2d.size(1), Order::kColumns);
  const auto* wp = w.data_ptr<int8_t>();
  const T* sp = scales.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t N = w.size(0);
  for_each_tile(a.M, N, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    switch (mt) {
      // one weight row at a time at batch 1: a sequential stream, 1.4x faster than 4 rows at once (measured)
      case 1: rows<1, 1>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
      case 2: rows<2, 4>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
      case 3: rows<3, 2>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
      default: rows<4, 2>(a, m0, wp, sp, bp, yp, n0, n1, N); break;
    }
  });
}

}  // namespace avx512
#endif

template <class T>
at::Tensor quantized(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias) {
  auto y = at::empty({x2d.size(0), w.size(0)}, x2d.options());
  [[maybe_unused]] const Isa isa = kernel_isa();
#if defined(LLMBUILD_INT8_AVX512)
  if (isa == Isa::kAvx512) {
    avx512::run<T>(x2d, w, scales, bias, y);
    return y;
  }
#endif
  const Int8Activations a = quantize_activations(x2d, x2d.size(1), Order::kColumns);
  const Args p{a, w.data_ptr<int8_t>(), w.size(0)};
  const T* sp = scales.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  for_each_tile(a.M, p.N, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
#if defined(LLMBUILD_AVX2)
    if (isa >= Isa::kAvx2) return avx2::tile(p, sp, bp, yp, m0, mt, n0, n1);
#endif
    portable::tile(p, sp, bp, yp, m0, mt, n0, n1);
  });
  return y;
}

// Rows [n0, n1) of w * scales (scales in the activation dtype S) into out [n1 - n0, K] (dtype O), split over
// threads.
template <class S, class O>
void dequantize_rows(const at::Tensor& w, const at::Tensor& scales, int64_t n0, int64_t n1, at::Tensor& out) {
  const int64_t K = w.size(1);
  const auto* wp = w.data_ptr<int8_t>();
  const S* sp = scales.data_ptr<S>();
  O* op = out.data_ptr<O>();
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const float s = static_cast<float>(sp[n]);
      const int8_t* wr = wp + n * K;
      O* o = op + (n - n0) * K;
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<O>(static_cast<float>(wr[k]) * s);
    }
  });
}

template <class T>
at::Tensor run(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias) {
  if (x2d.size(0) <= kQuantM && x2d.size(1) % kActBlock == 0) return quantized<T>(x2d, w, scales, bias);
  return dequantize_gemm(x2d, w.size(0), bias, [&](int64_t n0, int64_t n1, at::Tensor& out) {
    if (out.scalar_type() == at::kFloat) {
      dequantize_rows<T, float>(w, scales, n0, n1, out);
    } else {
      dequantize_rows<T, T>(w, scales, n0, n1, out);
    }
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

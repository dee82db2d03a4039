// linear_int4: y = x @ dequant(w).T (+ bias) for 4-bit weights in groups of G columns (32, 64, 128).
//
// Format (ISA-independent, written by the builder): w uint8 [N, K/2], where each 64-column block of a
// row takes 32 bytes: the low nibble of byte i holds column i, the high nibble column i + 32, so one
// AND and one shift unpack a block into 64 bytes in column order. scales, mins: bf16 [N, K/G];
// w_real[n, k] = q * scales[n, k/G] + mins[n, k/G] (asymmetric, as llama.cpp's Q4_1).
//
// With AVX512-VNNI and up to kVnniM rows of x, the weights are read once and multiplied as bytes
// against int8-quantized activations (vpdpbusd: 64 multiply-adds per instruction); the zero points
// fold into one dot product per row with the activations' group sums. Otherwise (larger batches,
// other CPUs) the weight is dequantized and a dense GEMM runs.
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstring>

#include "dequantize_gemm.h"
#include "ops.h"
#include "vnni.h"

namespace llmbuild {
namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// Rows of x up to which the VNNI kernel beats dequantize + dense GEMM. Measured on the 2-core AVX512
// machine, TinyLlama shapes (group 128): VNNI 2-4x faster at M=4, 1.6x at M=8, even at M=16, 2x slower at 128.
constexpr int64_t kVnniM = 16;

// Bytes ahead of the current block of each weight row to prefetch.
constexpr int64_t kPrefetch = 4096;

inline __m512i unpack_block(const uint8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// sum over groups of mins[g] * sums[g]: the zero-point term of one output.
inline float dot_mins(const uint16_t* mins, const float* sums, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, mins + g));
    const __m512 mv = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    acc = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, sums + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Scale of the group holding column k, one per half of a 16-lane vector: lanes 0-7 take column k's
// group, lanes 8-15 column k + 64's (the two 64-column blocks of one step). Past the last column, the
// last group (multiplied by zeros).
template <int G>
inline __m512 step_scales(const uint16_t* s, int64_t k, int64_t groups) {
  const int64_t g0 = k / G, g1 = std::min((k + 64) / G, groups - 1);
  if (g0 == g1) return _mm512_set1_ps(bf16_to_float(s[g0]));
  return _mm512_insertf32x8(_mm512_set1_ps(bf16_to_float(s[g0])), _mm256_set1_ps(bf16_to_float(s[g1])), 1);
}

// Output rows [n0, n1) for x rows [m0, m0 + MT). ROWS weight rows at a time keep ROWS x MT independent
// accumulator chains in flight. Each step of 128 columns is one 64-byte load per weight row whose low
// and high nibbles meet the activations' stored order (see vnni.h) in two vpdpbusd.
template <int MT, int ROWS, int G, class T>
void int4_rows(const Int8Activations& a, int64_t m0, const uint8_t* w, const uint16_t* scales,
               const uint16_t* mins, const T* bias, T* y, int64_t n0, int64_t n1, int64_t N) {
  const int64_t K = a.K, groups = K / G;
  const int8_t* xrow[MT];
  const float *xlanes[MT], *xsums[MT];
  for (int m = 0; m < MT; ++m) {
    xrow[m] = a.row(m0 + m);
    xlanes[m] = a.lanes(m0 + m);
    xsums[m] = a.sums(m0 + m);
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m512 acc[ROWS][MT];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kStep) {
      // a last step of only 64 columns loads 32 bytes; the activations are zero-padded to match
      const __mmask64 bytes = K - k >= kStep ? ~__mmask64{0} : (__mmask64{1} << ((K - k) / 2)) - 1;
      __m512i xlo[MT], xhi[MT];
      __m512 slo[MT], shi[MT];
      for (int m = 0; m < MT; ++m) {
        xlo[m] = _mm512_loadu_si512(xrow[m] + k);
        xhi[m] = _mm512_loadu_si512(xrow[m] + k + 64);
        slo[m] = _mm512_loadu_ps(xlanes[m] + k / 4);
        shi[m] = _mm512_loadu_ps(xlanes[m] + k / 4 + 16);
      }
      for (int r = 0; r < ROWS; ++r) {
        const uint8_t* wr = w + (n + r) * (K / 2) + k / 2;
        // the hardware prefetcher alone leaves this loop waiting on memory
        _mm_prefetch(reinterpret_cast<const char*>(wr) + kPrefetch, _MM_HINT_T0);
        const __m512i v = K - k >= kStep ? _mm512_loadu_si512(wr) : _mm512_maskz_loadu_epi8(bytes, wr);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const uint16_t* s = scales + (n + r) * groups;
        const __m512 sv_lo = step_scales<G>(s, k, groups), sv_hi = step_scales<G>(s, k + 32, groups);
        for (int m = 0; m < MT; ++m) {
          const __m512 dlo = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]));
          const __m512 dhi = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi[m]));
          acc[r][m] = _mm512_fmadd_ps(_mm512_mul_ps(dlo, slo[m]), sv_lo, acc[r][m]);
          acc[r][m] = _mm512_fmadd_ps(_mm512_mul_ps(dhi, shi[m]), sv_hi, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const float b = bias ? static_cast<float>(bias[n + r]) : 0.f;
      for (int m = 0; m < MT; ++m) {
        const float zero = dot_mins(mins + (n + r) * groups, xsums[m], groups);
        store(y + (m0 + m) * N + n + r, _mm512_reduce_add_ps(acc[r][m]) + zero + b);
      }
    }
  }
  if (n < n1) int4_rows<MT, 1, G>(a, m0, w, scales, mins, bias, y, n, n1, N);
}

template <int G, class T>
void int4_vnni(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
               const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const Int8Activations a = quantize_activations(x, G, Order::kInt4);
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const auto* mp = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t N = w.size(0);
  for_each_tile(a.M, N, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
    switch (mt) {
      case 1: int4_rows<1, 1, G>(a, m0, wp, sp, mp, bp, yp, n0, n1, N); break;
      case 2: int4_rows<2, 4, G>(a, m0, wp, sp, mp, bp, yp, n0, n1, N); break;
      case 3: int4_rows<3, 2, G>(a, m0, wp, sp, mp, bp, yp, n0, n1, N); break;
      default: int4_rows<4, 2, G>(a, m0, wp, sp, mp, bp, yp, n0, n1, N); break;
    }
  });
}

template <class T>
void run_vnni(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
              const c10::optional<at::Tensor>& bias, at::Tensor& y, int64_t group) {
  switch (group) {
    case 32: int4_vnni<32, T>(x, w, scales, mins, bias, y); break;
    case 64: int4_vnni<64, T>(x, w, scales, mins, bias, y); break;
    default: int4_vnni<128, T>(x, w, scales, mins, bias, y); break;
  }
}

bool use_vnni(const at::Tensor& x2d) { return x2d.size(0) <= kVnniM; }

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// One 64-column block of row n: 16 columns at a time, each 16 within one group.
template <class T>
void dequantize_block(const uint8_t* w, const uint16_t* s, const uint16_t* mins, int64_t k, int64_t group, T* out) {
  const __m512i q = unpack_block(w);
  for (int i = 0; i < 4; ++i) {
    const int64_t g = (k + 16 * i) / group;
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, i)));
    store16(out + 16 * i, _mm512_fmadd_ps(v, _mm512_set1_ps(bf16_to_float(s[g])), _mm512_set1_ps(bf16_to_float(mins[g]))));
  }
}

#else

bool use_vnni(const at::Tensor&) { return false; }
template <class T>
void run_vnni(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const c10::optional<at::Tensor>&, at::Tensor&, int64_t) {}

template <class T>
void dequantize_block(const uint8_t* w, const uint16_t* s, const uint16_t* mins, int64_t k, int64_t group, T* out) {
  for (int i = 0; i < 32; ++i) {
    const int64_t g0 = (k + i) / group, g1 = (k + i + 32) / group;
    store(out + i, static_cast<float>(w[i] & 0x0F) * bf16_to_float(s[g0]) + bf16_to_float(mins[g0]));
    store(out + i + 32, static_cast<float>(w[i] >> 4) * bf16_to_float(s[g1]) + bf16_to_float(mins[g1]));
  }
}

#endif

// Rows [n0, n1) of w_real into out [n1 - n0, K], split over threads.
template <class T>
void dequantize_rows(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins, int64_t n0, int64_t n1,
                     at::Tensor& out) {
  const int64_t K = w.size(1) * 2, groups = scales.size(1), group = K / groups;
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const auto* mp = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  T* op = out.data_ptr<T>();
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t k = 0; k < K; k += 64)
        dequantize_block(wp + n * (K / 2) + k / 2, sp + n * groups, mp + n * groups, k, group, op + (n - n0) * K + k);
  });
}

}  // namespace

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "linear_int4: w must be contiguous uint8 [N, K/2], got ", w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) > 0, "linear_int4: scales must be [N, K/group_size]");
  const int64_t group_size = K / scales.size(1);
  TORCH_CHECK((group_size == 32 || group_size == 64 || group_size == 128) && group_size * scales.size(1) == K,
              "linear_int4: K / scales.size(1) = ", K, " / ", scales.size(1), " must be a group size of 32, 64 or 128");
  TORCH_CHECK(K % 64 == 0 && K % group_size == 0, "linear_int4: K=", K, " must be a multiple of 64 and of group_size ",
              group_size);
  TORCH_CHECK(x.size(-1) == K, "linear_int4: x [..., ", x.size(-1), "] does not fit w of K=", K);
  for (const auto* t : {&scales, &mins}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == K / group_size,
                "linear_int4: scales and mins must be contiguous bf16 [", N, ", ", K / group_size, "]");
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear_int4: x must be bf16 or fp32, got ", x.scalar_type());
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->numel() == N && bias->is_contiguous()),
              "linear_int4: bias must be [", N, "] in x's dtype");
  const auto x2d = x.reshape({-1, K}).contiguous();
  at::Tensor y;
  if (use_vnni(x2d)) {
    y = at::empty({x2d.size(0), N}, x.options());
    if (x.scalar_type() == at::kFloat) {
      run_vnni<float>(x2d, w, scales, mins, bias, y, group_size);
    } else {
      run_vnni<c10::BFloat16>(x2d, w, scales, mins, bias, y, group_size);
    }
  } else {
    y = x.scalar_type() == at::kFloat
            ? dequantize_gemm<float>(x2d, N, bias, [&](int64_t n0, int64_t n1, at::Tensor& out) {
                dequantize_rows<float>(w, scales, mins, n0, n1, out);
              })
            : dequantize_gemm<c10::BFloat16>(x2d, N, bias, [&](int64_t n0, int64_t n1, at::Tensor& out) {
                dequantize_rows<c10::BFloat16>(w, scales, mins, n0, n1, out);
              });
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.view(out_shape);
}

}  // namespace llmbuild

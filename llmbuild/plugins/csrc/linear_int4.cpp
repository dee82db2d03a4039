// linear_int4: y = x @ dequant(w).T (+ bias) for 4-bit weights in groups of G columns (32, 64, 128).
//
// Format (ISA-independent, written by the builder): w uint8 [N, K/2], where each 64-column block of a
// row takes 32 bytes: the low nibble of byte i holds column i, the high nibble column i + 32, so one
// AND and one shift unpack a block into its two 32-column halves. scales, mins: bf16 [N, K/G];
// w_real[n, k] = q * scales[n, k/G] + mins[n, k/G] (asymmetric, as llama.cpp's Q4_1).
//
// Up to kQuantM rows of x (decode), the weights are read once and multiplied as bytes against
// int8-quantized activations (int8_activations.h); every tier sums the same exact 32-column integer
// products, scaled by the activation block's and the weight group's scales, and folds the zero points
// into one dot product per row with the activations' group sums:
//   avx512 (VNNI) one 64-byte load = two 64-column blocks, low and high nibbles into two vpdpbusd.
//   avx2          one 32-byte load = one 64-column block, each half into vpmaddubsw + vpmaddwd.
//   portable      the same sums in plain C++.
// Larger batches (prefill) dequantize cache-sized panels of the weight and run dense GEMMs.
#include <c10/util/BFloat16.h>

#include <cstring>
#include <type_traits>

#include "dequantize_gemm.h"
#include "int8_activations.h"
#include "isa.h"
#include "ops.h"

namespace llmbuild {
namespace {

// Rows of x up to which the quantized kernels beat dequantize + dense GEMM. Measured on the 2-core AVX512
// machine, TinyLlama shapes (group 128): VNNI 2-4x faster at M=4, 1.6x at M=8, even at M=16, 2x slower at
// 128. The same bound in every tier keeps the numerics of a batch independent of the tier.
constexpr int64_t kQuantM = 16;

// Bytes ahead of the current block of each weight row to prefetch (the hardware prefetcher alone leaves
// the decode loops waiting on memory).
constexpr int64_t kPrefetch = 4096;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// What every tier's tile needs: activations, the packed weight and its grid, the output.
template <class T>
struct Args {
  const Int8Activations& a;
  const uint8_t* w;
  const uint16_t* scales;  // bf16 bits [N, groups]
  const uint16_t* mins;
  const T* bias;
  T* y;
  int64_t N, group;
  int64_t groups() const { return a.K / group; }
};

template <class T>
void finish(const Args<T>& p, int64_t m, int64_t n, float dot, float zero) {
  store(p.y + m * p.N + n, dot + zero + (p.bias ? static_cast<float>(p.bias[n]) : 0.f));
}

namespace portable {

// sum over groups of mins[g] * sums[g]: the zero-point term of one output.
inline float dot_mins(const uint16_t* mins, const float* sums, int64_t groups) {
  float acc = 0.f;
  for (int64_t g = 0; g < groups; ++g) acc += bf16_to_float(mins[g]) * sums[g];
  return acc;
}

template <class T>
void tile(const Args<T>& p, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  const int64_t K = p.a.K, groups = p.groups();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = p.w + n * (K / 2);
    const uint16_t* s = p.scales + n * groups;
    for (int64_t m = m0; m < m0 + mt; ++m) {
      const int8_t* xr = p.a.row(m);
      const float* lanes = p.a.lanes(m);
      float acc = 0.f;
      for (int64_t k = 0; k < K; k += 64) {
        for (int half = 0; half < 2; ++half) {
          const int64_t col = k + 32 * half;
          int32_t dot = 0;
          for (int64_t i = 0; i < 32; ++i) dot += ((wr[k / 2 + i] >> (4 * half)) & 0x0F) * xr[col + i];
          acc += static_cast<float>(dot) * lanes[col / 4] * bf16_to_float(s[col / p.group]);
        }
      }
      finish(p, m, n, acc, dot_mins(p.mins + n * groups, p.a.sums(m), groups));
    }
  }
}

template <class T>
void dequantize_block(const uint8_t* w, const uint16_t* s, const uint16_t* mins, int64_t k, int64_t group, T* out) {
  for (int i = 0; i < 32; ++i) {
    const int64_t g0 = (k + i) / group, g1 = (k + i + 32) / group;
    store(out + i, static_cast<float>(w[i] & 0x0F) * bf16_to_float(s[g0]) + bf16_to_float(mins[g0]));
    store(out + i + 32, static_cast<float>(w[i] >> 4) * bf16_to_float(s[g1]) + bf16_to_float(mins[g1]));
  }
}

}  // namespace portable

#if defined(LLMBUILD_AVX2)
namespace avx2 {

inline float dot_mins(const uint16_t* mins, const float* sums, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g)));
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)), _mm256_loadu_ps(sums + g), acc);
  }
  float sum = hsum(acc);
  for (; g < groups; ++g) sum += bf16_to_float(mins[g]) * sums[g];
  return sum;
}

// Output rows [n0, n1) for x rows [m0, m0 + MT), ROWS weight rows at a time. Each 64-column block: one
// 32-byte load per weight row, whose low and high nibbles (columns k.., k + 32..) meet the activations
// in vpmaddubsw (unsigned 0..15 x signed: pair sums stay within int16), each 32-column product times its
// activation block's scale. WIDE (groups of 64 or 128: both halves in one group): the products of a group
// are summed before its weight scale multiplies them once; groups of 32 take their scale per half.
template <int MT, int ROWS, int G, class T>
void rows(const Args<T>& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr bool WIDE = G >= 64;
  constexpr int64_t span = WIDE ? G : 64;
  const int64_t K = p.a.K, groups = p.groups();
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
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
    for (int64_t g0 = 0; g0 < K; g0 += span) {
      // low and high halves in accumulators of their own: two independent FMA chains
      __m256 lo_sum[ROWS][MT], hi_sum[ROWS][MT];
      for (int r = 0; r < ROWS; ++r)
        for (int m = 0; m < MT; ++m) lo_sum[r][m] = hi_sum[r][m] = _mm256_setzero_ps();
      for (int64_t k = g0; k < g0 + span; k += 64) {
        for (int r = 0; r < ROWS; ++r) {
          const uint8_t* wr = p.w + (n + r) * (K / 2) + k / 2;
          _mm_prefetch(reinterpret_cast<const char*>(wr) + kPrefetch, _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
          const __m256i lo = _mm256_and_si256(v, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int m = 0; m < MT; ++m) {
            const int8_t* xr = xrow[m] + k;
            const float* lanes = xlanes[m] + k / 4;
            const __m256i plo = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))), ones);
            const __m256i phi = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))), ones);
            lo_sum[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(plo), _mm256_broadcast_ss(lanes), lo_sum[r][m]);
            hi_sum[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(phi), _mm256_broadcast_ss(lanes + 8), hi_sum[r][m]);
          }
        }
      }
      for (int r = 0; r < ROWS; ++r) {
        const uint16_t* s = p.scales + (n + r) * groups;
        const __m256 s_lo = _mm256_set1_ps(bf16_to_float(s[g0 / G]));
        for (int m = 0; m < MT; ++m) {
          if constexpr (WIDE) {
            acc[r][m] = _mm256_fmadd_ps(_mm256_add_ps(lo_sum[r][m], hi_sum[r][m]), s_lo, acc[r][m]);
          } else {
            acc[r][m] = _mm256_fmadd_ps(lo_sum[r][m], s_lo, acc[r][m]);
            acc[r][m] = _mm256_fmadd_ps(hi_sum[r][m], _mm256_set1_ps(bf16_to_float(s[g0 / G + 1])), acc[r][m]);
          }
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m)
        finish(p, m0 + m, n + r, hsum(acc[r][m]), dot_mins(p.mins + (n + r) * groups, p.a.sums(m0 + m), groups));
  }
  if (n < n1) rows<MT, 1, G>(p, m0, n, n1);
}

// One 64-column block of row n into fp32 (prefill below AVX512-BF16 runs its GEMM in fp32), 8 at a time.
inline void dequantize_block(const uint8_t* w, const uint16_t* s, const uint16_t* mins, int64_t k, int64_t group,
                             float* out) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i halves[2] = {_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)};
  for (int h = 0; h < 2; ++h) {
    const int64_t g = (k + 32 * h) / group;
    const __m256 scale = _mm256_set1_ps(bf16_to_float(s[g])), low = _mm256_set1_ps(bf16_to_float(mins[g]));
    const __m128i parts[2] = {_mm256_castsi256_si128(halves[h]), _mm256_extracti128_si256(halves[h], 1)};
    for (int i = 0; i < 4; ++i) {
      const __m128i bytes = i % 2 ? _mm_srli_si128(parts[i / 2], 8) : parts[i / 2];
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      _mm256_storeu_ps(out + 32 * h + 8 * i, _mm256_fmadd_ps(q, scale, low));
    }
  }
}

template <int G, class T>
void tile_of(const Args<T>& p, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  // batch 1: two weight rows at a time (int4 rows lie K/2 bytes apart, clear of the 4 KiB aliasing that
  // makes bf16 and int8 rows stream one at a time) for more independent work per loaded x block
  switch (mt) {
    case 1: rows<1, 2, G>(p, m0, n0, n1); break;
    case 2: rows<2, 1, G>(p, m0, n0, n1); break;
    case 3: rows<3, 1, G>(p, m0, n0, n1); break;
    default: rows<4, 1, G>(p, m0, n0, n1); break;
  }
}

template <class T>
void tile(const Args<T>& p, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  switch (p.group) {
    case 32: return tile_of<32>(p, m0, mt, n0, n1);
    case 64: return tile_of<64>(p, m0, mt, n0, n1);
    default: return tile_of<128>(p, m0, mt, n0, n1);
  }
}

}  // namespace avx2
#endif

#if defined(LLMBUILD_AVX512)
namespace avx512 {

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

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  // round to nearest even, as c10::BFloat16 does (no NaNs here: finite codes times finite scales)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// One 64-column block of row n: 16 columns at a time, each 16 within one group.
template <class T>
void dequantize_block(const uint8_t* w, const uint16_t* s, const uint16_t* mins, int64_t k, int64_t group, T* out) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)),
                                       _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), 1);
  for (int i = 0; i < 4; ++i) {
    const int64_t g = (k + 16 * i) / group;
    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, i)));
    store16(out + 16 * i, _mm512_fmadd_ps(x, _mm512_set1_ps(bf16_to_float(s[g])), _mm512_set1_ps(bf16_to_float(mins[g]))));
  }
}

#if defined(__AVX512VNNI__)
#define LLMBUILD_INT4_VNNI 1

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
// and high nibbles meet the activations' stored order (see int8_activations.h) in two vpdpbusd.
// NOTE: G is a template argument: group indices by a runtime divisor (an integer division per step and
// row) measured 1.2x slower at batch 1.
template <int MT, int ROWS, int G, class T>
void rows(const Args<T>& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = p.a.K, groups = p.groups();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int8_t* xrow[MT];
  const float* xlanes[MT];
  for (int m = 0; m < MT; ++m) {
    xrow[m] = p.a.row(m0 + m);
    xlanes[m] = p.a.lanes(m0 + m);
  }
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
        const uint8_t* wr = p.w + (n + r) * (K / 2) + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(wr) + kPrefetch, _MM_HINT_T0);
        const __m512i v = K - k >= kStep ? _mm512_loadu_si512(wr) : _mm512_maskz_loadu_epi8(bytes, wr);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const uint16_t* s = p.scales + (n + r) * groups;
        const __m512 sv_lo = step_scales<G>(s, k, groups);
        for (int m = 0; m < MT; ++m) {
          const __m512 dlo = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]));
          const __m512 dhi = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi[m]));
          if constexpr (G >= 64) {
            // a 64-column block's low and high halves share a group: one weight scale for both
            acc[r][m] = _mm512_fmadd_ps(_mm512_fmadd_ps(dhi, shi[m], _mm512_mul_ps(dlo, slo[m])), sv_lo, acc[r][m]);
          } else {
            const __m512 sv_hi = step_scales<G>(s, k + 32, groups);
            acc[r][m] = _mm512_fmadd_ps(_mm512_mul_ps(dlo, slo[m]), sv_lo, acc[r][m]);
            acc[r][m] = _mm512_fmadd_ps(_mm512_mul_ps(dhi, shi[m]), sv_hi, acc[r][m]);
          }
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m)
        finish(p, m0 + m, n + r, _mm512_reduce_add_ps(acc[r][m]), dot_mins(p.mins + (n + r) * groups, p.a.sums(m0 + m), groups));
  }
  if (n < n1) rows<MT, 1, G>(p, m0, n, n1);
}

template <int G, class T>
void tile_of(const Args<T>& p, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  switch (mt) {
    case 1: rows<1, 1, G>(p, m0, n0, n1); break;
    case 2: rows<2, 4, G>(p, m0, n0, n1); break;
    case 3: rows<3, 2, G>(p, m0, n0, n1); break;
    default: rows<4, 2, G>(p, m0, n0, n1); break;
  }
}

template <class T>
void tile(const Args<T>& p, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  switch (p.group) {
    case 32: return tile_of<32>(p, m0, mt, n0, n1);
    case 64: return tile_of<64>(p, m0, mt, n0, n1);
    default: return tile_of<128>(p, m0, mt, n0, n1);
  }
}
#endif

}  // namespace avx512
#endif

template <class T>
at::Tensor quantized(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
                     const c10::optional<at::Tensor>& bias, int64_t group) {
  [[maybe_unused]] const Isa isa = kernel_isa();
#if defined(LLMBUILD_INT4_VNNI)
  const bool vnni = isa == Isa::kAvx512;
#else
  const bool vnni = false;
#endif
  const Int8Activations a = quantize_activations(x2d, group, vnni ? Order::kInt4 : Order::kColumns);
  auto y = at::empty({x2d.size(0), w.size(0)}, x2d.options());
  const Args<T> p{a,
                  w.data_ptr<uint8_t>(),
                  reinterpret_cast<const uint16_t*>(scales.data_ptr()),
                  reinterpret_cast<const uint16_t*>(mins.data_ptr()),
                  bias ? bias->data_ptr<T>() : nullptr,
                  y.data_ptr<T>(),
                  w.size(0),
                  group};
  for_each_tile(a.M, p.N, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
#if defined(LLMBUILD_INT4_VNNI)
    if (vnni) return avx512::tile(p, m0, mt, n0, n1);
#endif
#if defined(LLMBUILD_AVX2)
    if (isa >= Isa::kAvx2) return avx2::tile(p, m0, mt, n0, n1);
#endif
    portable::tile(p, m0, mt, n0, n1);
  });
  return y;
}

// Rows [n0, n1) of w_real into out [n1 - n0, K] (dtype O), split over threads.
template <class O>
void dequantize_rows(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins, int64_t n0, int64_t n1,
                     at::Tensor& out) {
  const int64_t K = w.size(1) * 2, groups = scales.size(1), group = K / groups;
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const auto* mp = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  O* op = out.data_ptr<O>();
  [[maybe_unused]] const Isa isa = kernel_isa();
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      for (int64_t k = 0; k < K; k += 64) {
        const uint8_t* block = wp + n * (K / 2) + k / 2;
        O* o = op + (n - n0) * K + k;
#if defined(LLMBUILD_AVX512)
        if (isa == Isa::kAvx512) {
          avx512::dequantize_block(block, sp + n * groups, mp + n * groups, k, group, o);
          continue;
        }
#endif
#if defined(LLMBUILD_AVX2)
        if constexpr (std::is_same_v<O, float>) {
          if (isa >= Isa::kAvx2) {
            avx2::dequantize_block(block, sp + n * groups, mp + n * groups, k, group, o);
            continue;
          }
        }
#endif
        portable::dequantize_block(block, sp + n * groups, mp + n * groups, k, group, o);
      }
    }
  });
}

template <class T>
at::Tensor run(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
               const c10::optional<at::Tensor>& bias, int64_t group) {
  if (x2d.size(0) <= kQuantM) return quantized<T>(x2d, w, scales, mins, bias, group);
  return dequantize_gemm(x2d, w.size(0), bias, [&](int64_t n0, int64_t n1, at::Tensor& out) {
    if (out.scalar_type() == at::kFloat) {
      dequantize_rows<float>(w, scales, mins, n0, n1, out);
    } else {
      dequantize_rows<c10::BFloat16>(w, scales, mins, n0, n1, out);
    }
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
  const at::Tensor y = x.scalar_type() == at::kFloat ? run<float>(x2d, w, scales, mins, bias, group_size)
                                                     : run<c10::BFloat16>(x2d, w, scales, mins, bias, group_size);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.view(out_shape);
}

}  // namespace llmbuild

// linear_w8a8: y = (int8(x) @ w.T) * x_scale[t] * scales[n] (+ bias): int8 weights (linear_int8's format)
// against activations quantized per token inside the op, int32 sums over all of K (plugins/linear_w8a8.py).
//
// Three steps, each the same arithmetic in every tier, so tiers agree bit for bit with each other and with
// the reference (the sums are exact; the scaling is fp32 mul, mul, add in the reference's order):
//   1. quantize: per row of x, amax -> codes round(x * (127 / amax)), scale amax / 127.
//   2. acc [M, N] int32 = codes @ w.T:
//      avx512 (VNNI) our own, vpdpbusd (u8 x s8 sums into int32 lanes, exact): below kPackedMinRows rows
//                    dot-product tiles over the plain weight rows (4 x rows by 4 weight rows, x shifted to u8
//                    and the shift taken back with each weight row's sum); from there, panels of 64 weight
//                    rows packed per call into vpdpbusd's layout in cache, so each weight vector meets 4
//                    broadcast x groups with no horizontal sums. oneDNN's int8 matmul (at::_int_mm), which
//                    this tier ran before, reorders all of w into memory on every call: on one TinyLlama
//                    layer its bare GEMM took 1.3x our whole op's time at M = 16, 1.08x at 128 and at 2048
//                    (bench/results/w8a8-gemm.md).
//      avx2          our own: vpmaddubsw of |w| and x * sign(w), vpmaddwd to int32 (|w|, |x| <= 127: pair
//                    sums stay in int16). oneDNN is no option below VNNI: its AVX2 int8 matmul shifts x to
//                    u8 and saturates vpmaddubsw's int16 pair sums (wrong sums, measured), at 450 GOPS.
//      portable      the same sums in plain C++.
//   3. epilogue: y = (float(acc) * x_scale[t]) * scales[n] (+ bias[n]) in fp32, stored in x's dtype.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int8_activations.h"
#include "isa.h"
#include "ops.h"

#if defined(LLMBUILD_AVX512) && defined(__AVX512VNNI__)
#define LLMBUILD_W8A8_VNNI 1
#endif

namespace llmbuild {
namespace {

// ---- vector loads of x and stores of y in its dtype (fp32 values; bf16 and fp16 round to nearest even)

#if defined(LLMBUILD_AVX2)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  // c10's round_to_nearest_even, 8 lanes: bits + 0x7fff + lsb of the kept half; NaN -> 0x7fc0
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// The reference rounds the scaled product before adding the bias; GCC would contract the two into an fma
// (it does in ISO C++ mode too). An empty asm on the product keeps them apart.
template <class V>
inline V rounded(V v) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+x"(v));
  return v;
#else
  volatile V kept = v;
  return kept;
#endif
}

#if defined(LLMBUILD_AVX512)
// 16 lanes of fp32 values stored in T under a mask, rounded as store8 rounds.
inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 k) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
}
inline void store16(c10::Half* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// ---- 1. per-token quantization: codes [M, K] int8, scale [M] fp32

template <class T>
void quantize_row_portable(const T* x, int64_t K, int8_t* q, float& scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[k]) * inv));
  scale = amax / 127.f;
}

#if defined(LLMBUILD_AVX2)
// The portable row's arithmetic 8 columns at a time (max is exact; cvtps rounds to nearest even, as nearbyint).
template <class T>
void quantize_row_avx2(const T* x, int64_t K, int8_t* q, float& scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8(x + k), abs_mask));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float amax = std::max(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
  for (int64_t t = k; t < K; ++t) amax = std::max(amax, std::fabs(static_cast<float>(x[t])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k), vinv));
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[k]) * inv));
  scale = amax / 127.f;
}
#endif

template <class T>
void quantize(const T* x, int64_t M, int64_t K, int8_t* q, float* scale, Isa isa) {
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#if defined(LLMBUILD_AVX2)
      if (isa >= Isa::kAvx2) {
        quantize_row_avx2(x + m * K, K, q + m * K, scale[m]);
        continue;
      }
#endif
      quantize_row_portable(x + m * K, K, q + m * K, scale[m]);
    }
  });
}

// ---- 2. int32 sums acc [M, N] = q [M, K] @ w [N, K].T

// Rows of x from which the avx512 tier packs weight panels (vnni::packed_gemm) rather than running dot-product
// tiles over the plain rows (vnni::gemm): packing costs a pass over the weights per call, which pays once
// each packed panel meets enough rows (one TinyLlama layer, 2 AMD EPYC cores, the whole op: packed 1.68 / 1.98
// / 2.33 ms at M = 16 / 24 / 32, tiles 1.49-1.57 / 2.0-2.2 / 2.5-2.6 ms).
constexpr int64_t kPackedMinRows = 24;

struct Gemm {
  const int8_t* q;
  const int8_t* w;
  int32_t* acc;
  int64_t M, N, K;
};

void gemm_portable(const Gemm& g, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = m0; m < m0 + mt; ++m) {
      const int8_t* xr = g.q + m * g.K;
      const int8_t* wr = g.w + n * g.K;
      int32_t s = 0;
      for (int64_t k = 0; k < g.K; ++k) s += static_cast<int32_t>(xr[k]) * wr[k];
      g.acc[m * g.N + n] = s;
    }
  }
}

#if defined(LLMBUILD_AVX2)
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

// MT rows of x against ROWS weight rows at a time: ROWS x MT int32 accumulators (<= 8 of 16 ymm registers).
template <int MT, int ROWS>
void gemm_rows_avx2(const Gemm& g, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = g.K, K32 = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m256i acc[ROWS][MT];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
      __m256i xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.q + (m0 + m) * K + k));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.w + (n + r) * K + k));
        const __m256i wabs = _mm256_sign_epi8(wv, wv);
        for (int m = 0; m < MT; ++m) {
          const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv[m], wv));
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      const int8_t* wr = g.w + (n + r) * K;
      for (int m = 0; m < MT; ++m) {
        const int8_t* xr = g.q + (m0 + m) * K;
        int32_t s = hsum_epi32(acc[r][m]);
        for (int64_t k = K32; k < K; ++k) s += static_cast<int32_t>(xr[k]) * wr[k];
        g.acc[(m0 + m) * g.N + n + r] = s;
      }
    }
  }
  if (n < n1) gemm_rows_avx2<MT, 1>(g, m0, n, n1);
}

void gemm_avx2(const Gemm& g, int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
  switch (mt) {
    case 1: gemm_rows_avx2<1, 4>(g, m0, n0, n1); break;
    case 2: gemm_rows_avx2<2, 4>(g, m0, n0, n1); break;
    case 3: gemm_rows_avx2<3, 2>(g, m0, n0, n1); break;
    default: gemm_rows_avx2<4, 2>(g, m0, n0, n1); break;
  }
}
#endif

#if defined(LLMBUILD_W8A8_VNNI)
namespace vnni {

// The lane sums of a, b, c and d, in that order.
inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3), then (a, b, c, d) partial sums; then the four lanes
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// vpdpbusd multiplies unsigned by signed bytes: x's codes go in as u = q + 128 (a flipped sign bit), and
// sum(u * w) - 128 * sum(w) is the exact sum. MT rows of x against ROWS weight rows: MT + ROWS * MT + 1 of
// the 32 zmm registers.
template <int MT, int ROWS>
void rows(const Gemm& g, const uint8_t* xu, const int32_t* wsum, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t K = g.K, K64 = K / 64 * 64;
  const __mmask64 tail = K == K64 ? 0 : ~__mmask64{0} >> (64 - (K - K64));
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    // unrolled before GCC looks for registers, so that the tile lives in them
    __m512i acc[ROWS][MT];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
    auto step = [&](int64_t k, __mmask64 mask) __attribute__((always_inline)) {
      __m512i xv[MT];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi8(mask, xu + (m0 + m) * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const __m512i wv = _mm512_maskz_loadu_epi8(mask, g.w + (n + r) * K + k);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) dpbusd(acc[r][m], xv[m], wv);
      }
    };
    for (int64_t k = 0; k < K64; k += 64) step(k, ~__mmask64{0});
    if (tail) step(K64, tail);
    if constexpr (ROWS == 4) {
      // the four rows' sums of each x row at once: one 128-bit store per x row
      const __m128i bias = _mm_mullo_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wsum + (n - n0))),
                                           _mm_set1_epi32(128));
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        const __m128i sums = reduce4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(g.acc + (m0 + m) * g.N + n), _mm_sub_epi32(sums, bias));
      }
    } else {
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m)
          g.acc[(m0 + m) * g.N + n + r] = _mm512_reduce_add_epi32(acc[r][m]) - 128 * wsum[n - n0 + r];
    }
  }
  if (n < n1) rows<MT, 1>(g, xu, wsum + (n - n0), m0, n, n1);
}

// sum(w[n, :]) for rows [n0, n1): vpdpbusd of ones against each row.
void row_sums(const Gemm& g, int64_t n0, int64_t n1, int32_t* out) {
  const int64_t K = g.K, K64 = K / 64 * 64;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K64; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(g.w + n * K + k));
    int32_t s = _mm512_reduce_add_epi32(acc);
    for (int64_t k = K64; k < K; ++k) s += g.w[n * K + k];
    out[n - n0] = s;
  }
}

void gemm(const Gemm& g) {
  std::vector<uint8_t> xu(g.M * g.K);
  for (int64_t i = 0; i < g.M * g.K; ++i) xu[i] = static_cast<uint8_t>(g.q[i]) ^ 0x80;
  constexpr int64_t kPanel = 16;
  at::parallel_for(0, (g.N + kPanel - 1) / kPanel, 4, [&](int64_t p0, int64_t p1) {
    int32_t wsum[kPanel];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, n1 = std::min(n0 + kPanel, g.N);
      row_sums(g, n0, n1, wsum);
      for (int64_t n = n0; n < n1; n += 4) {
        const int64_t ne = std::min(n + 4, n1);
        const int32_t* ws = wsum + (n - n0);
        int64_t m = 0;
        for (; m + 4 <= g.M; m += 4) rows<4, 4>(g, xu.data(), ws, m, n, ne);
        switch (g.M - m) {
          case 1: rows<1, 4>(g, xu.data(), ws, m, n, ne); break;
          case 2: rows<2, 4>(g, xu.data(), ws, m, n, ne); break;
          case 3: rows<3, 4>(g, xu.data(), ws, m, n, ne); break;
          default: break;
        }
      }
    }
  });
}

// ---- From kPackedMinRows rows: panels of the weight packed into vpdpbusd's layout in cache, x broadcast.
// Each zmm holds 4 consecutive columns of 16 weight rows, so one vpdpbusd against x's 4-byte group (broadcast)
// adds to 16 outputs at once: no horizontal sums, and each loaded weight vector meets 4 x rows. Here the
// weight is the u8 operand (w + 128) and x the signed one, so the shift comes back as 128 * sum(x row).

constexpr int64_t kBlock = 16;   // weight rows per block (one zmm of int32 sums)
constexpr int64_t kBlocks = 4;   // blocks per panel

// r[i] (16 dwords of row i) -> r[j] (dword j of the 16 rows)
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Weight rows [n0, n0 + 16) (rows past N as zeros) -> dst [K / 4][16][4] bytes, w + 128. K % 64 == 0.
void pack_block(const Gemm& g, int64_t n0, uint8_t* dst) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < g.K; k += 64) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = n0 + i < g.N ? _mm512_loadu_si512(g.w + (n0 + i) * g.K + k) : _mm512_setzero_si512();
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (k / 4 + j) * 64, _mm512_xor_si512(r[j], flip));
  }
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// What the packed path writes instead of int32 sums: y = (float(sum) * xs[m]) * ws[n] (+ bias[n]) in T, the
// epilogue's arithmetic in its order, straight from the registers (no [M, N] int32 buffer: at M = 2048 its
// fresh pages alone cost more than the epilogue).
template <class T>
struct Output {
  const float* xs;
  const float* ws;
  const float* bias;
  T* y;
};

// x rows [m0, m0 + MT) against the packed panel of weight rows [n0, n0 + 64).
template <int MT, class T>
void packed_tile(const Gemm& g, const uint8_t* panel, const int32_t* xsum, const Output<T>& out, int64_t m0,
                 int64_t n0) {
  const int64_t K = g.K;
  __m512i acc[MT][kBlocks];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 16
    for (int j = 0; j < kBlocks; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 4) {
    __m512i wv[kBlocks];
#pragma GCC unroll 16
    for (int j = 0; j < kBlocks; ++j) wv[j] = _mm512_loadu_si512(panel + j * kBlock * K + k * kBlock);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m512i xb = _mm512_set1_epi32(load_i32(g.q + (m0 + m) * K + k));
#pragma GCC unroll 16
      for (int j = 0; j < kBlocks; ++j) dpbusd(acc[m][j], wv[j], xb);
    }
  }
  // (every loop over the tile unrolled: an index GCC cannot resolve keeps the whole tile in memory)
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    const __m512i shift = _mm512_set1_epi32(128 * xsum[m0 + m]);
    const __m512 xscale = _mm512_set1_ps(out.xs[m0 + m]);
#pragma GCC unroll 16
    for (int j = 0; j < kBlocks; ++j) {
      const int64_t n = n0 + j * kBlock, left = std::clamp<int64_t>(g.N - n, 0, kBlock);
      const __mmask16 valid = static_cast<__mmask16>((1u << left) - 1);
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][j], shift));
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(sum, xscale), _mm512_maskz_loadu_ps(valid, out.ws + n));
      if (out.bias) v = _mm512_add_ps(rounded(v), _mm512_maskz_loadu_ps(valid, out.bias + n));
      store16(out.y + (m0 + m) * g.N + n, v, valid);
    }
  }
}

template <class T>
void packed_gemm(const Gemm& g, const Output<T>& out) {
  std::vector<int32_t> xsum(g.M);
  at::parallel_for(0, g.M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < g.K; ++k) s += g.q[m * g.K + k];
      xsum[m] = s;
    }
  });
  constexpr int64_t kPanelRows = kBlock * kBlocks;
  at::parallel_for(0, (g.N + kPanelRows - 1) / kPanelRows, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint8_t> panel(kPanelRows * g.K);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelRows;
      for (int64_t j = 0; j < kBlocks; ++j) pack_block(g, n0 + j * kBlock, panel.data() + j * kBlock * g.K);
      int64_t m = 0;
      for (; m + 4 <= g.M; m += 4) packed_tile<4>(g, panel.data(), xsum.data(), out, m, n0);
      switch (g.M - m) {
        case 1: packed_tile<1>(g, panel.data(), xsum.data(), out, m, n0); break;
        case 2: packed_tile<2>(g, panel.data(), xsum.data(), out, m, n0); break;
        case 3: packed_tile<3>(g, panel.data(), xsum.data(), out, m, n0); break;
        default: break;
      }
    }
  });
}

}  // namespace vnni
#endif

at::Tensor int_gemm(const at::Tensor& q, const at::Tensor& w, Isa isa) {
  const int64_t M = q.size(0), N = w.size(0);
  auto acc = at::empty({M, N}, q.options().dtype(at::kInt));
  const Gemm g{q.data_ptr<int8_t>(), w.data_ptr<int8_t>(), acc.data_ptr<int32_t>(), M, N, q.size(1)};
#if defined(LLMBUILD_W8A8_VNNI)
  if (isa == Isa::kAvx512) {
    vnni::gemm(g);
    return acc;
  }
#endif
  for_each_tile(M, N, [&](int64_t m0, int64_t mt, int64_t n0, int64_t n1) {
#if defined(LLMBUILD_AVX2)
    if (isa >= Isa::kAvx2) return gemm_avx2(g, m0, mt, n0, n1);
#endif
    gemm_portable(g, m0, mt, n0, n1);
  });
  return acc;
}

// ---- 3. epilogue: y [M, N] = (float(acc) * x_scale[m]) * w_scale[n] (+ bias[n]), w_scale and bias in fp32

template <class T>
void epilogue(const at::Tensor& acc, const float* xs, const float* ws, const float* bias, T* y, Isa isa) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const int32_t* ap = acc.data_ptr<int32_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* a = ap + m * N;
      T* yr = y + m * N;
      int64_t n = 0;
#if defined(LLMBUILD_AVX2)
      if (isa >= Isa::kAvx2) {
        const __m256 s = _mm256_set1_ps(xs[m]);
        for (; n + 8 <= N; n += 8) {
          const __m256 af = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + n)));
          __m256 v = _mm256_mul_ps(_mm256_mul_ps(af, s), _mm256_loadu_ps(ws + n));
          if (bias) v = _mm256_add_ps(rounded(v), _mm256_loadu_ps(bias + n));
          store8(yr + n, v);
        }
      }
#endif
      for (; n < N; ++n) {
        float v = static_cast<float>(a[n]) * xs[m] * ws[n];
        if (bias) v = rounded(v) + bias[n];
        yr[n] = static_cast<T>(v);
      }
    }
  });
}

// Decode-sized batches take linear_int8's decode kernel (the same weights against activations quantized
// per 32 columns, vpdpbusd / vpmaddubsw): it streams the weight once at the memory bandwidth, where a
// GEMM call at M = 1 is slower inside an engine (TinyLlama, batch-1 decode: 33 tok/s through oneDNN's int8
// matmul, 43 through this path; bench/results/w8a8-tinyllama.md).
constexpr int64_t kDecodeRows = 4;

template <class T>
at::Tensor run(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& scales,
               const c10::optional<at::Tensor>& bias) {
  const Isa isa = kernel_isa();
  const int64_t M = x2d.size(0), K = x2d.size(1);
  if (M == 0) return at::empty({0, w.size(0)}, x2d.options());
  auto q = at::empty({M, K}, x2d.options().dtype(at::kChar));
  std::vector<float> xs(M);
  quantize(x2d.data_ptr<T>(), M, K, q.data_ptr<int8_t>(), xs.data(), isa);
  const at::Tensor ws = scales.to(at::kFloat).contiguous();
  const at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto y = at::empty({M, w.size(0)}, x2d.options());
#if defined(LLMBUILD_W8A8_VNNI)
  if (isa == Isa::kAvx512 && M >= kPackedMinRows && K % 64 == 0) {
    const Gemm g{q.data_ptr<int8_t>(), w.data_ptr<int8_t>(), nullptr, M, w.size(0), K};
    vnni::packed_gemm(g, vnni::Output<T>{xs.data(), ws.data_ptr<float>(), bias ? bf.data_ptr<float>() : nullptr,
                                         y.data_ptr<T>()});
    return y;
  }
#endif
  const at::Tensor acc = int_gemm(q, w, isa);
  epilogue(acc, xs.data(), ws.data_ptr<float>(), bias ? bf.data_ptr<float>() : nullptr, y.data_ptr<T>(), isa);
  return y;
}

}  // namespace

at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "linear_w8a8: w must be int8 [N, K], got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "linear_w8a8: x [..., ", x.size(-1), "] does not fit w ", w.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kHalf,
              "linear_w8a8: x must be bf16, fp16 or fp32, got ", dtype);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) && scales.scalar_type() == dtype,
              "linear_w8a8: scales must be [", w.size(0), "] in the activation dtype ", dtype);
  TORCH_CHECK(!bias || (bias->scalar_type() == dtype && bias->numel() == w.size(0)),
              "linear_w8a8: bias must be [", w.size(0), "] in x's dtype");
  const auto x2d = x.reshape({-1, x.size(-1)}).contiguous();
  if (x2d.size(0) <= kDecodeRows && x2d.size(0) > 0 && x.size(-1) % 32 == 0 && dtype != at::kHalf) {
    return linear_int8(x.contiguous(), w, scales, bias);
  }
  const auto wc = w.contiguous();
  at::Tensor y;
  if (dtype == at::kFloat) {
    y = run<float>(x2d, wc, scales, bias);
  } else if (dtype == at::kBFloat16) {
    y = run<c10::BFloat16>(x2d, wc, scales, bias);
  } else {
    y = run<c10::Half>(x2d, wc, scales, bias);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.size(0);
  return y.view(out_shape);
}

}  // namespace llmbuild

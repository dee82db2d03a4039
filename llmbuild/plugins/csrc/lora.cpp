// lora: a projection's output y plus each token's LoRA adapter (plugins/lora.py has the contract and the
// reference). x [T, in], y [T, out], a [S, n*R, in], b [S, R, out] (B transposed), ranks [S, n] int32,
// slots [T] int32.
//
// The step's adapted tokens are grouped by slot; each adapter runs at each slice's own rank (no padding
// to R) over its own tokens:
//
//   rows   = tokens t with slots[t] == s                    (one slot's group, s != 0)
//   shrink = fp32(x[rows]) @ fp32(a[s, jR : jR + r]).T       [m, r]      per slice j with r = ranks[s, j] > 0
//   out[rows, off_j : off_j + slices[j]] = round(fp32(y[rows, ...]) + shrink @ fp32(b[s, :r, off_j : ...]))
//
// Two paths compute it. Decode (up to kDecodeTokens adapted tokens) streams over each adapter's A and B
// once per step: each A row serves all of its group's tokens, a tile of kTile at a time (the shrink's
// dots, kDepth inputs per pass so x stays in L1); the expand walks output columns in chunks, adding each
// shrink value times a contiguous row of b into the tokens' fp32 chunks (axpys: b is stored transposed
// for this), the chunks starting from y and rounded once. Threads split the shrink's A rows and the
// expand's column chunks. The loops are portable C++ the compiler vectorizes for the library's -march;
// bf16 at the AVX-512 tier (with AVX512-BF16) takes vdpbf16ps for the dots, on x's own bf16 rows (bf16
// products are exact in fp32), and keeps a tile's accumulators in registers for the axpys. Prefill (more
// tokens): each adapter's two GEMMs, aten's (oneDNN's), on its widened A and B.
//
// Only the step's own slots' A and B are read, so the cost follows the adapters in the step, not the
// buffers' S; a step whose tokens are all slot 0 costs one scan of the slots and the copy of y.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <bit>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace llmbuild {
namespace {

// Adapted tokens up to which the decode loops run. They beat the GEMM path well past decode batches
// (gate_up 2048 -> 11264 bf16, rank 16, 2 cores: 0.15 vs 0.65 ms at 65 tokens, 0.27 vs 1.07 ms at 128),
// so they also take short prefill chunks; long prompts amortize aten's GEMMs.
constexpr int64_t kDecodeTokens = 256;
// Tokens whose dots share each pass over an A row.
constexpr int64_t kTile = 4;
// Inputs per pass of the shrink: a decode group's x over them (16 tokens: 32 KiB fp32) stays in L1.
constexpr int64_t kDepth = 512;
// Output columns of one expand work item: a token's fp32 chunk, and r rows of b that stay in L1.
constexpr int64_t kColumns = 128;
// Multiply-adds below which a thread's share is not worth waking another thread for (a few microseconds).
constexpr int64_t kParallelWork = 1 << 15;

void check_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& ranks, const at::Tensor& slots, at::IntArrayRef slices) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "lora: x ", x.sizes(), " and y ", y.sizes(),
              " must be [T, in] and [T, out]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(y.scalar_type() == dtype && a.scalar_type() == dtype && b.scalar_type() == dtype,
              "lora: x, y, a, b must share a dtype (x ", dtype, ", y ", y.scalar_type(), ", a ", a.scalar_type(),
              ", b ", b.scalar_type(), ")");
  const int64_t n = static_cast<int64_t>(slices.size());
  TORCH_CHECK(n > 0, "lora: slices is empty");
  int64_t total = 0;
  for (const int64_t w : slices) {
    TORCH_CHECK(w >= 0, "lora: slice width ", w, " is negative");
    total += w;
  }
  TORCH_CHECK(total == y.size(1), "lora: slices sum to ", total, ", y has ", y.size(1), " columns");
  TORCH_CHECK(a.dim() == 3 && a.size(1) % n == 0 && a.size(2) == x.size(1), "lora: a ", a.sizes(),
              " must be [S, ", n, " * R, ", x.size(1), "]");
  const int64_t slots_n = a.size(0), rank_cap = a.size(1) / n;
  TORCH_CHECK(b.dim() == 3 && b.size(0) == slots_n && b.size(1) == rank_cap && b.size(2) == total, "lora: b ",
              b.sizes(), " must be [", slots_n, ", ", rank_cap, ", ", total, "]");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.dim() == 2 && ranks.size(0) == slots_n && ranks.size(1) == n,
              "lora: ranks must be int32 [", slots_n, ", ", n, "]");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.dim() == 1 && slots.size(0) == x.size(0),
              "lora: slots must be int32 [", x.size(0), "]");
}

// One slot's tokens: keys[begin : end] (token indices), rows begin .. end of the step's shrink.
struct Group {
  int64_t slot, begin, end;
};

// The step's adapted tokens as groups by slot, and the shapes every path shares.
struct Step {
  const int64_t* tokens;  // token indices grouped by slot, in token order within a group
  c10::SmallVector<Group, 8> groups;
  const int32_t* ranks;  // [S, n]
  at::IntArrayRef slices;
  int64_t n, rank_cap;

  int64_t rank(const Group& g, int64_t j) const { return ranks[g.slot * n + j]; }
  int64_t adapted() const { return groups.back().end; }
};

// A grain for at::parallel_for over `items` items of `work` multiply-adds in all: one thread per
// kParallelWork, so small steps stay on the calling thread.
int64_t grain_for(int64_t items, int64_t work) {
  return std::max<int64_t>(1, items * kParallelWork / std::max<int64_t>(work, 1));
}

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16); }
inline float widen(c10::Half v) { return static_cast<float>(v); }

// fp32 -> T rounded to nearest even, as aten's .to() does.
template <typename T>
inline T narrow_to(float v) {
  return T(v);
}

// dst[t * stride] += dot(arow, xs[t]) over `len` elements, for `count` fp32 rows xs[t].
template <typename T>
void dots(const T* arow, const float* const* xs, int64_t k0, int64_t len, int64_t count, float* dst, int64_t stride) {
  int64_t t = 0;
  for (; t + kTile <= count; t += kTile) {
    const float *x0 = xs[t] + k0, *x1 = xs[t + 1] + k0, *x2 = xs[t + 2] + k0, *x3 = xs[t + 3] + k0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < len; ++i) {
      const float av = widen(arow[i]);
      s0 += av * x0[i];
      s1 += av * x1[i];
      s2 += av * x2[i];
      s3 += av * x3[i];
    }
    dst[t * stride] += s0, dst[(t + 1) * stride] += s1, dst[(t + 2) * stride] += s2, dst[(t + 3) * stride] += s3;
  }
  for (; t < count; ++t) {
    const float* xt = xs[t] + k0;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) s += widen(arow[i]) * xt[i];
    dst[t * stride] += s;
  }
}

#if defined(LLMBUILD_AVX512) && defined(__AVX512BF16__)
#define LLMBUILD_LORA_AVX512 1
#define LLMBUILD_LORA_BF16_DOTS true
// (The masked forms: GCC 12's unmasked ones read an undefined register and warn.)
inline float hsum512(__m512 v) {
  const __m512d d = _mm512_castps_pd(v);
  return hsum(_mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, d, 0)),
                            _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, d, 1))));
}

// 16 bf16 -> fp32 (a bf16 is the high half of its fp32).
inline __m512 widen16(const __m256i* p) {
  const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, wide, 16));
}

// The same dots on x's own bf16 rows: vdpbf16ps, 32 products (exact in fp32) per instruction, fp32 sums.
template <int M>
void dots_bf16_tile(const c10::BFloat16* arow, const c10::BFloat16* const* xs, int64_t k0, int64_t len, float* dst,
                    int64_t stride) {
  const int64_t main = len / 32 * 32;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < main; i += 32) {
    const __m512bh av = (__m512bh)_mm512_loadu_si512(arow + i);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], av, (__m512bh)_mm512_loadu_si512(xs[m] + k0 + i));
  }
  if (main < len) {
    const auto tail = static_cast<__mmask32>((1ull << (len - main)) - 1);
    const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(tail, arow + main);
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], av, (__m512bh)_mm512_maskz_loadu_epi16(tail, xs[m] + k0 + main));
    }
  }
  for (int m = 0; m < M; ++m) dst[m * stride] += hsum512(acc[m]);
}

void dots(const c10::BFloat16* arow, const c10::BFloat16* const* xs, int64_t k0, int64_t len, int64_t count,
          float* dst, int64_t stride) {
  int64_t t = 0;
  for (; t + kTile <= count; t += kTile) dots_bf16_tile<kTile>(arow, xs + t, k0, len, dst + t * stride, stride);
  switch (count - t) {
    case 3: return dots_bf16_tile<3>(arow, xs + t, k0, len, dst + t * stride, stride);
    case 2: return dots_bf16_tile<2>(arow, xs + t, k0, len, dst + t * stride, stride);
    case 1: return dots_bf16_tile<1>(arow, xs + t, k0, len, dst + t * stride, stride);
    default: return;
  }
}
#else
#define LLMBUILD_LORA_BF16_DOTS false
#endif

// shrink[row, jR + q] for every group, slice and q < its rank, from the adapted rows xs (grouped, as the
// shrink's rows are). The dots run kDepth inputs at a time, so a group's x stays in L1 while the
// thread's A rows pass.
template <typename T, typename X>
void shrink_all(const Step& st, const T* a, const X* const* xs, int64_t k, float* shrink) {
  const int64_t nr = st.n * st.rank_cap;
  c10::SmallVector<std::pair<int64_t, int64_t>, 256> items;  // (group, row of a[s]) of each A row to read
  int64_t work = 0;
  for (int64_t g = 0; g < static_cast<int64_t>(st.groups.size()); ++g) {
    for (int64_t j = 0; j < st.n; ++j) {
      for (int64_t q = 0; q < st.rank(st.groups[g], j); ++q) {
        items.emplace_back(g, j * st.rank_cap + q);
        work += (st.groups[g].end - st.groups[g].begin) * k;
      }
    }
  }
  std::fill(shrink, shrink + st.adapted() * nr, 0.f);
  const auto count = static_cast<int64_t>(items.size());
  at::parallel_for(0, count, grain_for(count, work), [&](int64_t i0, int64_t i1) {
    for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
      const int64_t len = std::min(kDepth, k - k0);
      for (int64_t i = i0; i < i1; ++i) {
        const auto [g, row] = items[i];
        const Group& grp = st.groups[g];
        dots(a + (grp.slot * nr + row) * k + k0, xs + grp.begin, k0, len, grp.end - grp.begin,
             shrink + grp.begin * nr + row, nr);
      }
    }
  });
}

// acc[t][c] += sum over q < r of sh[t][q] * b[q][c], for `tokens` tokens and `cols` columns; b's rows
// `width` apart.
template <typename T>
void axpys(float (*acc)[kColumns], const float* const* sh, int64_t tokens, const T* b, int64_t width, int64_t r,
           int64_t c0, int64_t cols) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t q = 0; q < r; ++q) {
      const T* bq = b + q * width;
      const float s = sh[t][q];
#pragma omp simd
      for (int64_t c = c0; c < cols; ++c) acc[t][c] += s * widen(bq[c]);
    }
  }
}

#if defined(LLMBUILD_LORA_AVX512)
// The same for bf16 b, 32 columns of up to kTile tokens in registers while the r rows of b pass.
template <int M>
void axpys_bf16_tile(float (*acc)[kColumns], const float* const* sh, const c10::BFloat16* b, int64_t width,
                     int64_t r, int64_t c) {
  __m512 v[M][2];
  for (int m = 0; m < M; ++m) v[m][0] = _mm512_loadu_ps(acc[m] + c), v[m][1] = _mm512_loadu_ps(acc[m] + c + 16);
  for (int64_t q = 0; q < r; ++q) {
    const auto* bq = reinterpret_cast<const __m256i*>(b + q * width + c);
    const __m512 b0 = widen16(bq);
    const __m512 b1 = widen16(bq + 1);
    for (int m = 0; m < M; ++m) {
      const __m512 s = _mm512_set1_ps(sh[m][q]);
      v[m][0] = _mm512_fmadd_ps(s, b0, v[m][0]);
      v[m][1] = _mm512_fmadd_ps(s, b1, v[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(acc[m] + c, v[m][0]), _mm512_storeu_ps(acc[m] + c + 16, v[m][1]);
}

void axpys(float (*acc)[kColumns], const float* const* sh, int64_t tokens, const c10::BFloat16* b, int64_t width,
           int64_t r, int64_t c0, int64_t cols) {
  if (kernel_isa() != Isa::kAvx512) return axpys<c10::BFloat16>(acc, sh, tokens, b, width, r, c0, cols);
  const int64_t main = c0 + (cols - c0) / 32 * 32;
  for (int64_t c = c0; c < main; c += 32) {
    switch (tokens) {
      case 4: axpys_bf16_tile<4>(acc, sh, b, width, r, c); break;
      case 3: axpys_bf16_tile<3>(acc, sh, b, width, r, c); break;
      case 2: axpys_bf16_tile<2>(acc, sh, b, width, r, c); break;
      default: axpys_bf16_tile<1>(acc, sh, b, width, r, c); break;
    }
  }
  axpys<c10::BFloat16>(acc, sh, tokens, b, width, r, main, cols);
}
#endif

// out[token, c0 : c1] += shrink @ b[s, :r, c0 : c1] for each adapted token, in fp32 from y (out's copy of
// it), rounded once; the columns lie in slice j. Tokens go kTile at a time over the chunk's rows of b.
template <typename T>
void expand_chunk(const Step& st, const T* b, const float* shrink, T* out, int64_t width, int64_t j, int64_t c0,
                  int64_t c1) {
  static_assert(kTile == 4, "axpys_bf16_tile takes up to 4 tokens");
  const int64_t nr = st.n * st.rank_cap, cols = c1 - c0;
  float acc[kTile][kColumns];
  for (const Group& g : st.groups) {
    const int64_t r = st.rank(g, j);
    if (r == 0) continue;
    for (int64_t row = g.begin; row < g.end; row += kTile) {
      const int64_t tokens = std::min(kTile, g.end - row);
      T* o[kTile];
      const float* sh[kTile];
      for (int64_t t = 0; t < tokens; ++t) {
        o[t] = out + st.tokens[row + t] * width + c0;
        sh[t] = shrink + (row + t) * nr + j * st.rank_cap;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) acc[t][c] = widen(o[t][c]);
      }
      axpys(acc, sh, tokens, b + g.slot * st.rank_cap * width + c0, width, r, 0, cols);
      for (int64_t t = 0; t < tokens; ++t) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) o[t][c] = narrow_to<T>(acc[t][c]);
      }
    }
  }
}

template <typename T>
void expand_all(const Step& st, const T* b, const float* shrink, T* out, int64_t width) {
  struct Chunk {
    int64_t slice, c0, c1;
  };
  c10::SmallVector<Chunk, 128> chunks;
  int64_t off = 0, work = 0;
  for (int64_t j = 0; j < st.n; ++j) {
    int64_t rows = 0;  // multiply-adds per column of this slice
    for (const Group& g : st.groups) rows += (g.end - g.begin) * st.rank(g, j);
    for (int64_t c = off; c < off + st.slices[j] && rows > 0; c += kColumns) {
      chunks.push_back({j, c, std::min(c + kColumns, off + st.slices[j])});
    }
    work += rows * st.slices[j];
    off += st.slices[j];
  }
  const auto count = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, count, grain_for(count, work), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      expand_chunk(st, b, shrink, out, width, chunks[i].slice, chunks[i].c0, chunks[i].c1);
    }
  });
}

template <typename T>
void decode(const Step& st, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t m = st.adapted(), k = x.size(1), nr = st.n * st.rank_cap;
  // reused across calls: a decode step allocates nothing but out
  thread_local std::vector<float> scratch;
  const bool bf16_dots = LLMBUILD_LORA_BF16_DOTS && std::is_same_v<T, c10::BFloat16> && kernel_isa() == Isa::kAvx512;
  scratch.resize(m * (bf16_dots ? nr : nr + k));  // the shrink, then x widened to fp32 where the dots need it
  float *shrink = scratch.data(), *xf = shrink + m * nr;
  const T* xp = x.data_ptr<T>();
  c10::SmallVector<const T*, 64> rows;  // the adapted tokens' rows of x, grouped
  for (int64_t row = 0; row < m; ++row) rows.push_back(xp + st.tokens[row] * k);
#if defined(LLMBUILD_LORA_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_dots) {
      shrink_all(st, a.data_ptr<T>(), rows.data(), k, shrink);
      expand_all(st, b.data_ptr<T>(), shrink, out.data_ptr<T>(), out.size(1));
      return;
    }
  }
#endif
  c10::SmallVector<const float*, 64> rows_f;
  for (int64_t row = 0; row < m; ++row) {
    float* dst = xf + row * k;
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) dst[i] = widen(rows[row][i]);
    rows_f.push_back(dst);
  }
  shrink_all(st, a.data_ptr<T>(), rows_f.data(), k, shrink);
  expand_all(st, b.data_ptr<T>(), shrink, out.data_ptr<T>(), out.size(1));
}

// The prefill path: per group and slice, the shrink and expand GEMMs on fp32 copies of its rows.
void gemm(const Step& st, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  // a view of the token indices: the index ops read it before this function returns
  const at::Tensor idx = at::from_blob(const_cast<int64_t*>(st.tokens), {st.adapted()}, at::kLong);
  const at::Tensor xf = x.index_select(0, idx).to(at::kFloat);  // [m, in]
  at::Tensor acc = out.index_select(0, idx).to(at::kFloat);     // [m, out]; a fresh tensor, also for fp32
  for (const Group& g : st.groups) {
    const at::Tensor as = a.select(0, g.slot), bs = b.select(0, g.slot);
    const at::Tensor xg = xf.narrow(0, g.begin, g.end - g.begin);
    at::Tensor accg = acc.narrow(0, g.begin, g.end - g.begin);
    int64_t off = 0;
    for (int64_t j = 0; j < st.n; ++j) {
      const int64_t r = st.rank(g, j), width = st.slices[j];
      if (r > 0 && width > 0) {
        const at::Tensor shrink = at::mm(xg, as.narrow(0, j * st.rank_cap, r).to(at::kFloat).t());  // [m, r]
        accg.narrow(1, off, width).addmm_(shrink, bs.narrow(0, 0, r).narrow(1, off, width).to(at::kFloat));
      }
      off += width;
    }
  }
  out.index_copy_(0, idx, acc.to(out.scalar_type()));
}

}  // namespace

at::Tensor lora(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& ranks, const at::Tensor& slots, at::IntArrayRef slices) {
  check_args(x, y, a, b, ranks, slots, slices);
  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  const at::Tensor slots_c = slots.contiguous();
  const int32_t* sp = slots_c.data_ptr<int32_t>();
  const int64_t tokens = slots_c.size(0), slots_n = a.size(0);
  // keys slot * T + t of the adapted tokens: sorted, they group tokens by slot in token order
  c10::SmallVector<int64_t, 64> keys;
  for (int64_t t = 0; t < tokens; ++t) {
    if (sp[t] != 0) {
      TORCH_CHECK(sp[t] > 0 && sp[t] < slots_n, "lora: token ", t, " has slot ", sp[t], " (slots 0..", slots_n - 1,
                  ")");
      keys.push_back(sp[t] * tokens + t);
    }
  }
  if (keys.empty()) {
    return out;
  }
  std::sort(keys.begin(), keys.end());
  for (int64_t& k : keys) k %= tokens;  // now token indices, grouped by slot
  const at::Tensor ranks_c = ranks.contiguous();
  const int64_t n = static_cast<int64_t>(slices.size());
  Step st{keys.data(), {}, ranks_c.data_ptr<int32_t>(), slices, n, a.size(1) / n};
  const auto adapted = static_cast<int64_t>(keys.size());
  for (int64_t begin = 0; begin < adapted;) {
    const int64_t s = sp[keys[begin]];
    int64_t end = begin + 1;
    while (end < adapted && sp[keys[end]] == s) ++end;
    st.groups.push_back({s, begin, end});
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = st.rank(st.groups.back(), j);
      TORCH_CHECK(r >= 0 && r <= st.rank_cap, "lora: slot ", s, " has rank ", r, " in slice ", j, " (max_rank ",
                  st.rank_cap, ")");
    }
    begin = end;
  }
  const auto dtype = x.scalar_type();
  if (adapted > kDecodeTokens || (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)) {
    gemm(st, x, a, b, out);
  } else if (dtype == at::kBFloat16) {
    decode<c10::BFloat16>(st, x.contiguous(), a.contiguous(), b.contiguous(), out);
  } else if (dtype == at::kHalf) {
    decode<c10::Half>(st, x.contiguous(), a.contiguous(), b.contiguous(), out);
  } else {
    decode<float>(st, x.contiguous(), a.contiguous(), b.contiguous(), out);
  }
  return out;
}

}  // namespace llmbuild

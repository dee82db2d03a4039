// paged_attention: write the step's K/V at slot_mapping, then attend through block_tables.
// quantized_paged_attention: the same over an int8 or fp8 (e4m3) cache with per-kv-head scales.
// Layout and metadata: see llmbuild/plugins/paged_attention.py.
//
// Decode tokens (one new token per sequence) run a block-walking kernel parallel over
// (sequence, kv head); so do a few new tokens continuing a cached context (up to kMaxQueryTokens: a
// speculative step's last token and its proposals), each query row over its own causal prefix with the very
// arithmetic of a decode token at that position, and each K/V row loaded once for all of them. Longer
// prompt chunks gather their context and use aten's SDPA, in the same forms transformers uses (is_causal for
// a fresh prompt), so bf16 prefill matches it bit for bit.
// The decode kernel's vector path (8 fp32 lanes, the AVX2 and AVX-512 tiers alike) converts blocks of 8 K/V
// rows to fp32 once for all the query rows of its group, sums each row's 8 dot products in one tree and takes
// exp in vectors; a portable loop serves other head sizes and the portable tier. 16 lanes (AVX-512) measured
// slower on the AMD EPYC (Zen 4) this was written on, whose 512-bit units are 256 bits wide, at head dims 64 and
// 128: 106-118 against 128-132 GFLOP/s, and 121-130 against 143-150 (bench/results/decode-attention.md).
// An int8 cache is read as int8 by the decode kernel (half the bytes of bf16: decode attention is
// bound by reading the cache), its K scale folded into the query and its V scale applied to the output.
// An fp8 cache (a GPU format) takes the portable loop: it is here for the builder's quality check.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace llmbuild {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "paged_attention: q, k, v must be [T, heads, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_attention: caches must both be [blocks, kv_heads, block_size, D]");
  const auto t = q.size(0), h = q.size(1), d = q.size(2), hkv = k_cache.size(1);
  TORCH_CHECK(k.size(0) == t && k.size(1) == hkv && k.size(2) == d && k.sizes() == v.sizes(),
              "paged_attention: k/v must be [", t, ", ", hkv, ", ", d, "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k_cache.size(3) == d, "paged_attention: cache head_dim ", k_cache.size(3), " != ", d);
  TORCH_CHECK(h % hkv == 0, "paged_attention: ", h, " query heads is not a multiple of ", hkv, " kv heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type(),
              "paged_attention: q, k and v dtypes must match");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "paged_attention: q/k/v head_dim must be contiguous");
  const auto b = seq_lens.size(0);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == t && slot_mapping.scalar_type() == at::kLong,
              "paged_attention: slot_mapping must be int64 [", t, "]");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == b + 1 && cu_seqlens_q.scalar_type() == at::kInt,
              "paged_attention: cu_seqlens_q must be int32 [", b + 1, "]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == b && block_tables.scalar_type() == at::kInt &&
                  block_tables.is_contiguous(),
              "paged_attention: block_tables must be contiguous int32 [", b, ", max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "paged_attention: seq_lens must be int32");
}

// int8 cache: x / scale rounded half to even and saturated to [-127, 127]; fp8 cache: x / scale
// saturated to [-448, 448] and rounded half to even to e4m3; as quantize_kv does.
template <typename scalar_t, typename cache_t>
void write_cache(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, const float* head_scales) {
  // src: [T, H_kv, D] (row stride may exceed H_kv * D: a view into the fused qkv output)
  const auto t = src.size(0), hkv = src.size(1), d = src.size(2), bs = cache.size(2);
  const auto s0 = src.stride(0), s1 = src.stride(1);
  const scalar_t* in = src.data_ptr<scalar_t>();
  cache_t* out = cache.data_ptr<cache_t>();
  at::parallel_for(0, t, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t blk = slots[i] / bs, off = slots[i] % bs;
      for (int64_t h = 0; h < hkv; ++h) {
        const scalar_t* from = in + i * s0 + h * s1;
        cache_t* to = out + ((blk * hkv + h) * bs + off) * d;
        if constexpr (std::is_same_v<cache_t, int8_t>) {
          const float s = head_scales[h];
          for (int64_t e = 0; e < d; ++e) {
            to[e] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<float>(from[e]) / s), -127.f, 127.f));
          }
        } else if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn>) {
          const float s = head_scales[h];
          for (int64_t e = 0; e < d; ++e) {
            to[e] = c10::Float8_e4m3fn(std::clamp(static_cast<float>(from[e]) / s, -448.f, 448.f));
          }
        } else {
          std::copy_n(from, d, to);
        }
      }
    }
  });
}

// Per-thread buffers of the decode kernel, reused across the (sequence, kv head) items of a thread.
struct DecodeScratch {
  std::vector<float> scores, q, acc, block;
};


// New tokens of a sequence with a cached context up to which the decode kernel serves them (above: SDPA over
// the gathered context). Verifying k proposals is 1 + k tokens, k <= 16 (speculative.num_speculative_tokens):
// all of them on the decode kernel, so that each is computed as its decode step would (through SDPA each costs
// a gather of the whole context and a mask, ~15x a decode token's attention on a small model).
constexpr int64_t kMaxQueryTokens = 17;

// Query rows of one (sequence, kv head) item: `rows` = new tokens x group, row r belonging to new token
// r / group, which sees the first first_len + r / group context positions (first_len = ctx_len for a decode
// token).
struct QueryRows {
  int64_t rows, group, first_len, ctx_len;
  int64_t len(int64_t r) const { return first_len + r / group; }
  // the first row that sees position p
  int64_t first_row(int64_t p) const { return p < first_len ? 0 : (p - first_len + 1) * group; }
};

#if defined(LLMBUILD_AVX2)
// Lane i of the result: the sum of v[i]'s 8 lanes (one horizontal-add tree for 8 sums, instead of one
// horizontal sum each).
inline __m256 sum8_256(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif


#if defined(LLMBUILD_AVX2)
// 8 fp32 lanes.
struct Vec8 {
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::BFloat16* p) {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  }
  static V load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) { return hsum(v); }
  static void sum8(const V* v, float* out) { _mm256_storeu_ps(out, sum8_256(v)); }
  static float top(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static V round(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V v, V n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(v, _mm256_castsi256_ps(e));
  }
  static V zero_below(V v, V x, float limit) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_LT_OQ), v);
  }
};
#endif

// exp(x) for x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// for an exact product), exp(r) by its degree-7 Taylor polynomial (relative error < 1e-8), times 2^n.
// Below -87.3 (where 2^n would leave the normal range) the result is taken as 0.
template <class Vec>
typename Vec::V vexp(typename Vec::V x) {
  using V = typename Vec::V;
  const V n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  V r = Vec::fmadd(n, Vec::set1(-0.693145751953125f), x);
  r = Vec::fmadd(n, Vec::set1(-1.428606765330187045e-06f), r);
  V p = Vec::set1(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f}) p = Vec::fmadd(p, r, Vec::set1(c));
  return Vec::zero_below(Vec::scale2(p, n), x, -87.3f);
}

// Softmax of one row of scores in place: vectors over the full chunks, the same exp on a zero-padded
// copy of the last partial chunk.
template <class Vec>
void softmax_row(float* s, int64_t n) {
  using V = typename Vec::V;
  constexpr int64_t W = Vec::kWidth;
  const int64_t main = n / W * W;
  float mx = -INFINITY;
  if (main > 0) {
    V m = Vec::load(s);
    for (int64_t p = W; p < main; p += W) m = Vec::max(m, Vec::load(s + p));
    mx = Vec::top(m);
  }
  for (int64_t p = main; p < n; ++p) mx = std::max(mx, s[p]);
  const V top = Vec::set1(mx);
  V sum = Vec::zero();
  for (int64_t p = 0; p < main; p += W) {
    const V e = vexp<Vec>(Vec::sub(Vec::load(s + p), top));
    Vec::store(s + p, e);
    sum = Vec::add(sum, e);
  }
  float total = Vec::sum(sum);
  if (main < n) {
    alignas(64) float tail[W];
    for (int64_t i = 0; i < W; ++i) tail[i] = main + i < n ? s[main + i] - mx : -INFINITY;
    Vec::store(tail, vexp<Vec>(Vec::load(tail)));
    for (int64_t i = 0; main + i < n; ++i) {
      s[main + i] = tail[i];
      total += tail[i];
    }
  }
  const V inv = Vec::set1(1.f / total);
  for (int64_t p = 0; p < main; p += W) Vec::store(s + p, Vec::mul(Vec::load(s + p), inv));
  for (int64_t p = main; p < n; ++p) s[p] *= 1.f / total;
}

// Context positions per block of the vectorized decode kernel: their K (then V) rows are converted to fp32
// once into a scratch block, and each query row's 8 dot products are summed in one tree.
constexpr int64_t kBlock = 8;

// The vectorized decode kernel: qf [rows, d] (scaled queries), scores [rows, stride] scratch (stride: ctx_len
// rounded up to kBlock), acc [rows, d] zeroed, block [kBlock, d] scratch. Rows run over whole blocks: the
// scores a row computes past its own length are never read, and its weights there are zeroed before the V
// pass, which therefore adds exactly what a decode token at that row's position adds, in the same order.
// d is a multiple of the vector width.
template <class Vec, typename cache_t>
void decode_group_vec(const float* qf, const cache_t* k_cache, const cache_t* v_cache, const int32_t* table,
                      const QueryRows& q, int64_t g, int64_t hkv, int64_t bs, int64_t d, float* scores, float* acc,
                      float* block) {
  using V = typename Vec::V;
  constexpr int64_t W = Vec::kWidth;
  const int64_t nv = d / W, ctx_len = q.ctx_len, stride = (ctx_len + kBlock - 1) / kBlock * kBlock;
  // the block of positions [p0, p0 + kBlock) of one cache as fp32 rows, zeros past the context
  auto load_block = [&](const cache_t* cache, int64_t p0) {
    for (int64_t b = 0; b < kBlock; ++b) {
      const int64_t p = p0 + b;
      const cache_t* row = p < ctx_len ? cache + ((table[p / bs] * hkv + g) * bs + p % bs) * d : nullptr;
      if (p + kBlock < ctx_len) {  // the next block's row: the rows of a sequence are scattered over its blocks
        const int64_t next = p + kBlock;
        const char* ahead = reinterpret_cast<const char*>(cache + ((table[next / bs] * hkv + g) * bs + next % bs) * d);
        for (int64_t line = 0; line < d * static_cast<int64_t>(sizeof(cache_t)); line += 64) {
          __builtin_prefetch(ahead + line);
        }
      }
      for (int64_t i = 0; i < nv; ++i) Vec::store(block + b * d + W * i, row ? Vec::load(row + W * i) : Vec::zero());
    }
  };
  for (int64_t p0 = 0; p0 < ctx_len; p0 += kBlock) {
    load_block(k_cache, p0);
    for (int64_t j = q.first_row(p0); j < q.rows; ++j) {
      const float* qj = qf + j * d;
      V dot[kBlock];
      const V q0 = Vec::load(qj);
      for (int64_t b = 0; b < kBlock; ++b) dot[b] = Vec::mul(q0, Vec::load(block + b * d));
      for (int64_t i = 1; i < nv; ++i) {
        const V qi = Vec::load(qj + W * i);
        for (int64_t b = 0; b < kBlock; ++b) dot[b] = Vec::fmadd(qi, Vec::load(block + b * d + W * i), dot[b]);
      }
      Vec::sum8(dot, scores + j * stride + p0);
    }
  }
  for (int64_t j = 0; j < q.rows; ++j) {
    float* sj = scores + j * stride;
    softmax_row<Vec>(sj, q.len(j));
    std::fill(sj + q.len(j), sj + stride, 0.f);
  }
  for (int64_t p0 = 0; p0 < ctx_len; p0 += kBlock) {
    load_block(v_cache, p0);
    for (int64_t j = q.first_row(p0); j < q.rows; ++j) {
      V w[kBlock];
      for (int64_t b = 0; b < kBlock; ++b) w[b] = Vec::set1(scores[j * stride + p0 + b]);
      float* a = acc + j * d;
      for (int64_t i = 0; i < nv; ++i) {
        V sum = Vec::load(a + W * i);
        for (int64_t b = 0; b < kBlock; ++b) sum = Vec::fmadd(w[b], Vec::load(block + b * d + W * i), sum);
        Vec::store(a + W * i, sum);
      }
    }
  }
}

// The portable decode kernel, same arguments as decode_group_vec.
template <typename cache_t>
void decode_group_scalar(const float* qf, const cache_t* k_cache, const cache_t* v_cache, const int32_t* table,
                         const QueryRows& q, int64_t g, int64_t hkv, int64_t bs, int64_t d, float* scores,
                         float* acc) {
  const int64_t ctx_len = q.ctx_len;
  for (int64_t p = 0; p < ctx_len; ++p) {
    const cache_t* krow = k_cache + ((table[p / bs] * hkv + g) * bs + p % bs) * d;
    for (int64_t j = q.first_row(p); j < q.rows; ++j) {
      const float* qj = qf + j * d;
      float dot = 0.f;
      for (int64_t e = 0; e < d; ++e) dot += qj[e] * static_cast<float>(krow[e]);
      scores[j * ctx_len + p] = dot;
    }
  }
  for (int64_t j = 0; j < q.rows; ++j) {
    float* sj = scores + j * ctx_len;
    const int64_t n = q.len(j);
    float mx = -INFINITY;
    for (int64_t p = 0; p < n; ++p) mx = std::max(mx, sj[p]);
    float sum = 0.f;
    for (int64_t p = 0; p < n; ++p) {
      sj[p] = std::exp(sj[p] - mx);
      sum += sj[p];
    }
    const float inv = 1.f / sum;
    for (int64_t p = 0; p < n; ++p) sj[p] *= inv;
  }
  for (int64_t p = 0; p < ctx_len; ++p) {
    const cache_t* vrow = v_cache + ((table[p / bs] * hkv + g) * bs + p % bs) * d;
    for (int64_t j = q.first_row(p); j < q.rows; ++j) {
      const float w = scores[j * ctx_len + p];
      for (int64_t e = 0; e < d; ++e) acc[j * d + e] += w * static_cast<float>(vrow[e]);
    }
  }
}

// The new tokens [row0, row0 + n) of one sequence (context ctx_len, theirs included), for the `group` query
// heads that share kv head `g`. k_scale / v_scale: the head's dequantization scales (1 for a plain cache).
template <typename scalar_t, typename cache_t>
void decode_group(const at::Tensor& q_all, int64_t row0, int64_t n, const cache_t* k_cache, const cache_t* v_cache,
                  const int32_t* table, int64_t ctx_len, int64_t g, int64_t group, int64_t hkv, int64_t bs,
                  int64_t d, float scale, float k_scale, float v_scale, scalar_t* out, DecodeScratch& scratch) {
  const QueryRows rows{n * group, group, ctx_len - n + 1, ctx_len};
  scratch.scores.resize(rows.rows * (ctx_len + kBlock));
  scratch.block.resize(kBlock * d);
  scratch.q.resize(rows.rows * d);
  scratch.acc.assign(rows.rows * d, 0.f);
  float* qf = scratch.q.data();
  float* acc = scratch.acc.data();
  const scalar_t* q = q_all.data_ptr<scalar_t>();
  const int64_t heads = q_all.size(1);
  // the K scale and the softmax scale folded into the query
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < group; ++j) {
      const scalar_t* qj = q + (row0 + t) * q_all.stride(0) + (g * group + j) * q_all.stride(1);
      for (int64_t e = 0; e < d; ++e) qf[(t * group + j) * d + e] = static_cast<float>(qj[e]) * scale * k_scale;
    }
  }
  bool done = false;
  // fp8 (a GPU format, run here by the builder's checks) and fp64 take the portable loop
  if constexpr (!std::is_same_v<cache_t, double> && !std::is_same_v<cache_t, c10::Float8_e4m3fn>) {
    [[maybe_unused]] const Isa isa = kernel_isa();
#if defined(LLMBUILD_AVX2)
    if (!done && isa >= Isa::kAvx2 && d % Vec8::kWidth == 0) {
      decode_group_vec<Vec8>(qf, k_cache, v_cache, table, rows, g, hkv, bs, d, scratch.scores.data(), acc,
                             scratch.block.data());
      done = true;
    }
#endif
  }
  if (!done) decode_group_scalar(qf, k_cache, v_cache, table, rows, g, hkv, bs, d, scratch.scores.data(), acc);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < group; ++j) {
      scalar_t* o = out + ((row0 + t) * heads + g * group + j) * d;
      for (int64_t e = 0; e < d; ++e) o[e] = static_cast<scalar_t>(acc[(t * group + j) * d + e] * v_scale);
    }
  }
}

template <typename scalar_t, typename cache_t>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const std::vector<int64_t>& seqs, const int32_t* tables, int64_t max_blocks, const int32_t* lens,
                const int32_t* cu, double scale, const float* k_scales, const float* v_scales, at::Tensor& out) {
  const auto h = q.size(1), d = q.size(2), hkv = k_cache.size(1), bs = k_cache.size(2);
  const auto group = h / hkv;
  const int64_t items = static_cast<int64_t>(seqs.size()) * hkv;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    DecodeScratch scratch;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = seqs[it / hkv], g = it % hkv;
      decode_group<scalar_t, cache_t>(q, cu[b], cu[b + 1] - cu[b], k_cache.data_ptr<cache_t>(),
                                      v_cache.data_ptr<cache_t>(), tables + b * max_blocks, lens[b], g, group, hkv,
                                      bs, d, static_cast<float>(scale), k_scales ? k_scales[g] : 1.f,
                                      v_scales ? v_scales[g] : 1.f, op, scratch);
    }
  });
}

at::Tensor gather_context(const at::Tensor& cache, const at::Tensor& table_row, int64_t ctx_len) {
  // [n_blocks, H_kv, bs, D] -> [1, H_kv, ctx_len, D]
  const auto n_blocks = (ctx_len + cache.size(2) - 1) / cache.size(2);
  auto blocks = cache.index_select(0, table_row.slice(0, 0, n_blocks).to(at::kLong));
  return blocks.transpose(0, 1).reshape({1, cache.size(1), -1, cache.size(3)}).slice(2, 0, ctx_len);
}

// [1, H_kv, ctx_len, D] in the activation dtype: a quantized cache dequantized with its head scales
// (in fp32, then rounded to the activation dtype: what dequantize_kv in paged_attention.py does).
at::Tensor context(const at::Tensor& cache, const at::Tensor& table_row, int64_t ctx_len,
                   const c10::optional<at::Tensor>& head_scales, at::ScalarType dtype) {
  auto values = gather_context(cache, table_row, ctx_len);
  if (!head_scales) return values;
  return values.to(at::kFloat).mul(head_scales->view({1, -1, 1, 1})).to(dtype);
}

// Both ops: kv_scales is [2, H_kv] fp32 (K row, V row) for an int8 or fp8 cache, absent for a plain one.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                  at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                  const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q, const c10::optional<at::Tensor>& kv_scales,
                  double scale) {
  check_inputs(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q);
  const bool quantized = kv_scales.has_value();
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  if (quantized) {
    TORCH_CHECK((k_cache.scalar_type() == at::kChar || fp8) && v_cache.scalar_type() == k_cache.scalar_type(),
                "quantized_paged_attention: caches must be int8 or float8_e4m3fn, got ", k_cache.scalar_type());
    TORCH_CHECK(kv_scales->scalar_type() == at::kFloat && kv_scales->is_contiguous() && kv_scales->dim() == 2 &&
                    kv_scales->size(0) == 2 && kv_scales->size(1) == k_cache.size(1),
                "quantized_paged_attention: kv_scales must be contiguous float32 [2, ", k_cache.size(1), "], got ",
                kv_scales->sizes());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == v.scalar_type(),
                "paged_attention: cache dtype ", k_cache.scalar_type(), " != k/v dtype ", k.scalar_type());
  }
  const float* k_scales = quantized ? kv_scales->data_ptr<float>() : nullptr;
  const float* v_scales = quantized ? k_scales + k_cache.size(1) : nullptr;
  c10::optional<at::Tensor> k_heads, v_heads;
  if (quantized) {
    k_heads = (*kv_scales)[0];
    v_heads = (*kv_scales)[1];
  }
  const auto slots = slot_mapping.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "paged_attention_write", [&] {
    if (quantized && fp8) {
      write_cache<scalar_t, c10::Float8_e4m3fn>(k, k_cache, slots.data_ptr<int64_t>(), k_scales);
      write_cache<scalar_t, c10::Float8_e4m3fn>(v, v_cache, slots.data_ptr<int64_t>(), v_scales);
    } else if (quantized) {
      write_cache<scalar_t, int8_t>(k, k_cache, slots.data_ptr<int64_t>(), k_scales);
      write_cache<scalar_t, int8_t>(v, v_cache, slots.data_ptr<int64_t>(), v_scales);
    } else {
      write_cache<scalar_t, scalar_t>(k, k_cache, slots.data_ptr<int64_t>(), nullptr);
      write_cache<scalar_t, scalar_t>(v, v_cache, slots.data_ptr<int64_t>(), nullptr);
    }
  });

  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const auto lens_t = seq_lens.contiguous(), cu_t = cu_seqlens_q.contiguous();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int32_t* cu = cu_t.data_ptr<int32_t>();
  std::vector<int64_t> walked;  // sequences the decode kernel serves
  for (int64_t b = 0; b < seq_lens.size(0); ++b) {
    const int64_t n = cu[b + 1] - cu[b], ctx_len = lens[b];
    TORCH_CHECK(n <= ctx_len && ctx_len <= block_tables.size(1) * k_cache.size(2),
                "paged_attention: sequence ", b, " has ", n, " new tokens and context ", ctx_len);
    if (n == 1 || (n > 1 && n < ctx_len && n <= kMaxQueryTokens)) {
      walked.push_back(b);
    } else if (n > 1) {
      auto keys = context(k_cache, block_tables[b], ctx_len, k_heads, q.scalar_type());
      auto values = context(v_cache, block_tables[b], ctx_len, v_heads, q.scalar_type());
      auto qb = q.slice(0, cu[b], cu[b + 1]).transpose(0, 1).unsqueeze(0);
      c10::optional<at::Tensor> mask;
      if (n < ctx_len) {  // a chunk continuing a cached prefix: query j sits at ctx_len - n + j
        mask = at::ones({n, ctx_len}, q.options().dtype(at::kBool)).tril(ctx_len - n);
      }
      auto o = at::scaled_dot_product_attention(qb, keys, values, mask, 0.0, /*is_causal=*/n == ctx_len, scale,
                                                /*enable_gqa=*/true);
      out.slice(0, cu[b], cu[b + 1]).copy_(o[0].transpose(0, 1));
    }
  }
  if (!walked.empty()) {
    const auto tables = block_tables.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_decode", [&] {
      if (quantized && fp8) {
        decode_all<scalar_t, c10::Float8_e4m3fn>(q, k_cache, v_cache, walked, tables.data_ptr<int32_t>(),
                                                 block_tables.size(1), lens, cu, scale, k_scales, v_scales, out);
      } else if (quantized) {
        decode_all<scalar_t, int8_t>(q, k_cache, v_cache, walked, tables.data_ptr<int32_t>(), block_tables.size(1),
                                     lens, cu, scale, k_scales, v_scales, out);
      } else {
        decode_all<scalar_t, scalar_t>(q, k_cache, v_cache, walked, tables.data_ptr<int32_t>(),
                                       block_tables.size(1), lens, cu, scale, nullptr, nullptr, out);
      }
    });
  }
  return out;
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                           at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q, double scale) {
  return attend(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, c10::nullopt, scale);
}

at::Tensor quantized_paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                     const at::Tensor& cu_seqlens_q, const at::Tensor& kv_scales, double scale) {
  return attend(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, kv_scales, scale);
}

}  // namespace llmbuild

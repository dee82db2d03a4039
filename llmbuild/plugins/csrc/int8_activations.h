// What the decode paths of the weight-only kernels (linear_int8, linear_int4) share, in every tier:
// dynamic int8 quantization of the activation rows, the tiling of the output over threads, and small
// vector helpers.
//
// Integer dot products (vpdpbusd, vpmaddubsw) multiply weight bytes by activation bytes, so the
// quantized linear kernels quantize their bf16/fp32 input rows on the fly: symmetric, one scale per 32
// columns (the block size of llama.cpp's Q8_0, small enough that an outlier column costs little
// precision elsewhere). Each call quantizes M x K values, negligible beside the N x K weights it then
// streams. Every tier sums the same exact 32-column integer products, so tiers differ only in the
// order of their fp32 additions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace llmbuild {

constexpr int64_t kActBlock = 32;

// Quantized rows are zero-padded to a multiple of 128 columns. For the AVX-512 int4 kernel they are
// stored in steps of 128 columns with the 2nd and 3rd 32-column blocks swapped (0-31, 64-95, 32-63,
// 96-127): the order in which a 64-byte load of packed int4 weights (two 64-column blocks) yields its low
// and high nibbles. Otherwise they keep column order.
constexpr int64_t kStep = 128;

enum class Order { kColumns, kInt4 };

inline int64_t stored_column(int64_t k, Order order) {
  if (order == Order::kColumns) return k;
  const int64_t block = (k % kStep) / kActBlock;
  const int64_t swapped = block == 1 ? 2 : block == 2 ? 1 : block;
  return k - (k % kStep) + swapped * kActBlock + k % kActBlock;
}

struct Int8Activations {
  int64_t M = 0, K = 0, Kp = 0, group = 0;
  std::vector<int8_t> q;           // [M, Kp], stored order
  std::vector<float> lane_scale;   // [M, Kp / 4]: scale of the block each 4-column vpdpbusd lane falls in
  std::vector<float> group_sum;    // [M, K / group]: sum of the dequantized activations of each group

  const int8_t* row(int64_t m) const { return q.data() + m * Kp; }
  const float* lanes(int64_t m) const { return lane_scale.data() + m * (Kp / 4); }
  const float* sums(int64_t m) const { return group_sum.data() + m * (K / group); }
};

// x: [M, K] contiguous bf16 or fp32, K % group == 0 and group % 32 == 0. group_sum serves the
// weights' zero points.
inline Int8Activations quantize_activations(const at::Tensor& x, int64_t group, Order order) {
  Int8Activations a;
  a.M = x.size(0);
  a.K = x.size(1);
  a.Kp = (a.K + kStep - 1) / kStep * kStep;
  a.group = group;
  a.q.assign(a.M * a.Kp, 0);
  a.lane_scale.assign(a.M * a.Kp / 4, 0.f);
  a.group_sum.assign(a.M * a.K / group, 0.f);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t b = 0; b < a.K; b += kActBlock) {
      const float* xb = xp + m * a.K + b;
      float amax = 0.f;
      for (int64_t i = 0; i < kActBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      const int64_t at = m * a.Kp + stored_column(b, order);
      for (int64_t i = 0; i < kActBlock; ++i) {
        a.q[at + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
        sum += a.q[at + i];
      }
      std::fill_n(a.lane_scale.data() + at / 4, kActBlock / 4, scale);
      a.group_sum[m * (a.K / group) + b / group] += scale * static_cast<float>(sum);
    }
  }
  return a;
}

// Runs tile(m0, rows, n0, n1) over every output tile: x rows in tiles of up to 4, weight rows in
// panels of kPanel split over threads. A panel (a few KB of packed weights) stays in cache while each
// x tile passes over it, so M > 4 reads the weights from memory once.
template <class Tile>
void for_each_tile(int64_t M, int64_t N, Tile&& tile) {
  constexpr int64_t kPanel = 16;
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, n1 = std::min(n0 + kPanel, N);
      for (int64_t m = 0; m < M; m += 4) tile(m, std::min<int64_t>(4, M - m), n0, n1);
    }
  });
}

inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }

}  // namespace llmbuild

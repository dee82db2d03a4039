// Prefill-sized batches of the linear ops: dense GEMMs over panels of the weight converted (dequantized,
// or widened from bf16) into a cache-sized buffer, so the converted weight never travels to memory (a full
// copy per call would cost more than the GEMM saves). Computes y.T panel by panel (contiguous rows).
//
// The GEMM runs in bf16 where the library's tier has native bf16 dot products (AVX512-BF16: oneDNN's bf16
// GEMM is the fastest path there) and in fp32 elsewhere: without them aten's bf16 GEMM is an emulation
// several times slower than its fp32 one (measured 16 vs 108 GFLOP/s on a 2-core AVX2 EPYC).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "isa.h"

namespace llmbuild {

// The dtype prefill GEMMs of activations in `dtype` run in (see above).
inline at::ScalarType gemm_dtype(at::ScalarType dtype) {
#if defined(LLMBUILD_AVX512) && defined(__AVX512BF16__)
  if (kernel_isa() == Isa::kAvx512) return dtype;
#endif
  return at::kFloat;
}

// convert_rows(n0, n1, out) writes rows [n0, n1) of the real weight into out [n1 - n0, K] (dtype of out:
// gemm_dtype). Returns y [M, N] in x2d's dtype.
template <class ConvertRows>
at::Tensor dequantize_gemm(const at::Tensor& x2d, int64_t N, const c10::optional<at::Tensor>& bias,
                           ConvertRows&& convert_rows) {
  const int64_t K = x2d.size(1);
  const at::ScalarType compute = gemm_dtype(x2d.scalar_type());
  const auto x = x2d.to(compute);
  const int64_t bytes = static_cast<int64_t>(at::elementSize(compute));
  const int64_t panel = std::max<int64_t>(64, (int64_t{1} << 20) / (K * bytes) / 64 * 64);
  auto buffer = at::empty({std::min(panel, N), K}, x.options());
  auto yt = at::empty({N, x.size(0)}, x.options());
  const auto xt = x.t();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t n1 = std::min(n0 + panel, N);
    auto dense = buffer.narrow(0, 0, n1 - n0);
    convert_rows(n0, n1, dense);
    auto out = yt.narrow(0, n0, n1 - n0);
    at::mm_out(out, dense, xt);
  }
  if (bias) yt.add_(bias->to(compute).unsqueeze(1));
  return yt.t().to(x2d.scalar_type()).contiguous();
}

}  // namespace llmbuild

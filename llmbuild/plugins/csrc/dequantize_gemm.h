// Prefill-sized batches of the weight-only quantized linear ops: dense GEMMs over panels of the weight
// dequantized into a cache-sized buffer, so the dequantized weight never travels to memory (a full
// bf16 copy per call would cost more than the GEMM saves). Computes y.T panel by panel (contiguous rows).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace llmbuild {

// dequantize_rows(n0, n1, out) writes rows [n0, n1) of the real weight into out [n1 - n0, K].
template <class T, class DequantizeRows>
at::Tensor dequantize_gemm(const at::Tensor& x2d, int64_t N, const c10::optional<at::Tensor>& bias,
                           DequantizeRows&& dequantize_rows) {
  const int64_t K = x2d.size(1);
  const int64_t panel = std::max<int64_t>(64, (int64_t{1} << 20) / (K * static_cast<int64_t>(sizeof(T))) / 64 * 64);
  auto buffer = at::empty({std::min(panel, N), K}, x2d.options());
  auto yt = at::empty({N, x2d.size(0)}, x2d.options());
  const auto xt = x2d.t();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t n1 = std::min(n0 + panel, N);
    auto dense = buffer.narrow(0, 0, n1 - n0);
    dequantize_rows(n0, n1, dense);
    auto out = yt.narrow(0, n0, n1 - n0);
    at::mm_out(out, dense, xt);
  }
  if (bias) yt.add_(bias->unsqueeze(1));
  return yt.t().contiguous();
}

}  // namespace llmbuild

// Prefill-sized batches of the linear ops: dense GEMMs over panels of the weight converted (dequantized,
// or widened from bf16) into a cache-sized buffer, so the converted weight never travels to memory (a full
// copy per call would cost more than the GEMM saves).
//
// The GEMM runs in bf16 where the library's tier has native bf16 dot products (AVX512-BF16: aten's bf16
// GEMM is oneDNN's fastest path there) and in fp32 elsewhere: without them aten's bf16 GEMM is an emulation
// several times slower than its fp32 one (measured 60 vs 190-230 GFLOP/s, 2 cores kept to AVX2). The fp32
// GEMMs go to oneDNN's inner product where torch has it: on 4 MB panels of the prefill shapes it measured
// 231-245 GFLOP/s against 175-221 for aten's fp32 mm (MKL), 2 cores of an AMD EPYC kept to AVX2.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

// x [M, K] @ dense.T for dense [n, K] of x's dtype: [M, n].
inline at::Tensor panel_gemm(const at::Tensor& x, const at::Tensor& dense) {
  static const auto inner_product = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (x.scalar_type() == at::kFloat && inner_product.has_value()) {
    // boxed: the op's C++ signature is torch-internal; its schema (X, W, B?, attr, scalars, algorithm?) is not
    torch::jit::Stack stack{x, dense, c10::IValue(), "none", c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    inner_product->callBoxed(&stack);
    return stack.back().toTensor();
  }
  return at::mm(x, dense.t());
}

// convert_rows(n0, n1, out) writes rows [n0, n1) of the real weight into out [n1 - n0, K] (dtype of out:
// gemm_dtype). Returns y [M, N] in x2d's dtype.
template <class ConvertRows>
at::Tensor dequantize_gemm(const at::Tensor& x2d, int64_t N, const c10::optional<at::Tensor>& bias,
                           ConvertRows&& convert_rows) {
  const int64_t K = x2d.size(1);
  const at::ScalarType compute = gemm_dtype(x2d.scalar_type());
  const auto x = x2d.to(compute).contiguous();
  const int64_t bytes = static_cast<int64_t>(at::elementSize(compute));
  // 4 MB panels: cache-resident, and large enough GEMMs (512 rows of K=2048 fp32 measured best)
  const int64_t panel = std::max<int64_t>(64, (int64_t{4} << 20) / (K * bytes) / 64 * 64);
  auto buffer = at::empty({std::min(panel, N), K}, x.options());
  // each panel's product lands in y in x2d's dtype at once (bias added first, in the GEMM's dtype): no
  // second pass over an fp32 y (a 16-prompt bf16 prefill at AVX2 spent 6% of its time in such copies)
  auto y = at::empty({x.size(0), N}, x2d.options());
  const at::Tensor b = bias ? bias->to(compute) : at::Tensor();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t n1 = std::min(n0 + panel, N);
    auto dense = buffer.narrow(0, 0, n1 - n0);
    convert_rows(n0, n1, dense);
    auto part = panel_gemm(x, dense);
    if (bias) part.add_(b.narrow(0, n0, n1 - n0));
    y.narrow(1, n0, n1 - n0).copy_(part);
  }
  return y;
}

}  // namespace llmbuild

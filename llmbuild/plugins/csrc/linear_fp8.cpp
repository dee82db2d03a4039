// linear_fp8: y = fp8(x) @ w.T * x_scale * w_scales (+ bias), e4m3 weights with per-tensor or per-row
// fp32 scales and activations quantized per call to e4m3 with one scale (plugins/linear_fp8.py).
//
// This CPU has no fp8 arithmetic, and cpu recipes reject fp8 weights; the kernel exists for the
// builder, which measures a cuda fp8 engine's quality on the CPU. e4m3 values and their products are
// exact in fp32, so upcasting both operands and running an fp32 GEMM computes what an fp8 GEMM with
// fp32 accumulation does (torch._scaled_mm on sm_89/sm_90), up to summation order.
#include "ops.h"

namespace llmbuild {

at::Tensor linear_fp8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat8_e4m3fn, "linear_fp8: w must be float8_e4m3fn [N, K]");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(x.size(-1) == k, "linear_fp8: x has ", x.size(-1), " columns, w has ", k);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && (scales.numel() == 1 || scales.numel() == n),
              "linear_fp8: scales must be fp32 with 1 or N elements");
  constexpr double kMax = 448.0;  // largest finite e4m3 value
  const at::Tensor xf = x.reshape({-1, k}).to(at::kFloat);
  const at::Tensor x_scale = (xf.abs().amax() / kMax).clamp_min(1e-12);
  const at::Tensor xq = (xf / x_scale).clamp(-kMax, kMax).to(at::kFloat8_e4m3fn);
  at::Tensor y = at::linear(xq.to(at::kFloat), w.to(at::kFloat)) * x_scale * scales.reshape({1, -1});
  if (bias.has_value()) {
    y = y + bias->to(at::kFloat);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.to(x.scalar_type()).reshape(shape);
}

}  // namespace llmbuild

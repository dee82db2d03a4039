// linear_int8: y = x @ (w * scales[:, None]).T (+ bias), int8 weights with per-row scales.
//
// Decode-sized bf16 batches read the int8 weights directly through aten's weight-only kernel
// (half the bytes of bf16, so up to twice the decode speed where memory bandwidth rules). Larger
// batches (prefill) and fp32 activations dequantize the weight once per call and run a dense GEMM,
// which is faster there than the weight-only kernel (see kDequantM).
#include <cstdint>

#include "ops.h"

namespace llmbuild {

// Rows of x from which dequantize + dense GEMM beats aten's int8 weight-only kernel (bf16). Measured on
// the 2-core AVX512 machine, [5632, 2048] weight: even at M=16, dequantize 1.8x faster at M=32, 3x at 128.
constexpr int64_t kDequantM = 16;

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "linear_int8: w must be int8 [N, K], got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "linear_int8: x [..., ", x.size(-1), "] does not fit w ", w.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) && scales.scalar_type() == x.scalar_type(),
              "linear_int8: scales must be [", w.size(0), "] in the activation dtype ", x.scalar_type());
  const auto x2d = x.reshape({-1, x.size(-1)});
  at::Tensor y;
  // aten's kernel (torch 2.13) silently returns garbage when K is not a multiple of 16 and crashes on
  // weights or scales that are not 64-byte aligned (safetensors packs tensors back to back): measured
  const bool aligned = reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0 &&
                       reinterpret_cast<uintptr_t>(scales.data_ptr()) % 64 == 0;
  if (x.scalar_type() == at::kBFloat16 && x2d.size(0) < kDequantM && w.size(1) % 16 == 0 && aligned &&
      w.is_contiguous() && scales.is_contiguous()) {
    y = at::_weight_int8pack_mm(x2d.contiguous(), w, scales);
    if (bias) y.add_(*bias);
  } else {
    y = at::linear(x2d, w.to(x.scalar_type()).mul_(scales.unsqueeze(1)), bias);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.size(0);
  return y.view(out_shape);
}

}  // namespace llmbuild

// llmbuild op library: CPU kernels behind the schemas in library.cpp.
// Each op has a torch reference in llmbuild/plugins/<op>.py and a test comparing the two.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace llmbuild {

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                           at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q, double scale);

// paged_attention over int8 caches; kv_scales [2, H_kv] fp32: per-kv-head K and V scales.
at::Tensor quantized_paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                     const at::Tensor& cu_seqlens_q, const at::Tensor& kv_scales, double scale);

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias);

// linear_w8a8: linear_int8's weights against activations quantized per token; int32 sums (linear_w8a8.cpp).
at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias);

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
                       const c10::optional<at::Tensor>& bias);

at::Tensor linear_fp8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin);

at::Tensor swiglu(const at::Tensor& gate_up);

// lora: y plus each token's adapter from the slot buffers a, b, ranks (lora.cpp; contract in plugins/lora.py).
at::Tensor lora(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& ranks, const at::Tensor& slots, at::IntArrayRef slices);

}  // namespace llmbuild

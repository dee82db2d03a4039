// Op schemas (the contract shared by model graphs, the CPU kernels here and the CUDA kernels) and
// their CPU registrations. A compiled engine needs only this library loaded (torch.ops.load_library).
#include <torch/library.h>

#include "isa.h"
#include "ops.h"

TORCH_LIBRARY(llmbuild, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor cu_seqlens_q, float scale) -> Tensor");
  m.def(
      "quantized_paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor cu_seqlens_q, Tensor kv_scales, "
      "float scale) -> Tensor");
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("linear_w8a8(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scales, Tensor mins, Tensor? bias) -> Tensor");
  m.def("linear_fp8(Tensor x, Tensor w, Tensor scales, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor positions, Tensor cos, Tensor sin) -> Tensor");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("lora(Tensor x, Tensor y, Tensor a, Tensor b, Tensor ranks, Tensor slots, int[] slices) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmbuild, CPU, m) {
  m.impl("paged_attention", &llmbuild::paged_attention);
  m.impl("quantized_paged_attention", &llmbuild::quantized_paged_attention);
  m.impl("linear", &llmbuild::linear);
  m.impl("linear_int8", &llmbuild::linear_int8);
  m.impl("linear_w8a8", &llmbuild::linear_w8a8);
  m.impl("linear_int4", &llmbuild::linear_int4);
  m.impl("linear_fp8", &llmbuild::linear_fp8);
  m.impl("rms_norm", &llmbuild::rms_norm);
  m.impl("add_rms_norm", &llmbuild::add_rms_norm);
  m.impl("rope", &llmbuild::rope);
  m.impl("swiglu", &llmbuild::swiglu);
  m.impl("lora", &llmbuild::lora);
}

// Which kernel tiers this build holds and which one the ops use (isa.h); not model ops.
TORCH_LIBRARY(llmbuild_isa, m) {
  m.def("compiled() -> str[]", &llmbuild::compiled_isas);
  m.def("use(str isa) -> ()", &llmbuild::set_isa_cap);
}

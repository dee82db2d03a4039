// Op schemas (the contract shared by model graphs, the CPU kernels here and the CUDA kernels) and
// their CPU registrations. A compiled engine needs only this library loaded (torch.ops.load_library).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(llmbuild, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor cu_seqlens_q, float scale) -> Tensor");
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmbuild, CPU, m) {
  m.impl("paged_attention", &llmbuild::paged_attention);
  m.impl("linear", &llmbuild::linear);
}

// lora: a projection's output y plus each token's LoRA adapter (plugins/lora.py has the contract and the
// reference). x [T, in], y [T, out], a [S, n*R, in], b [S, out, R], ranks [S, n] int32, slots [T] int32.
//
// The step's tokens are grouped by slot; each adapter in the step runs its shrink and expand GEMMs once over
// its own token rows, at each slice's own rank (no padding to R):
//
//   rows   = tokens t with slots[t] == s                    (one slot's group, s != 0)
//   acc    = fp32(y[rows])                                   [m, out]
//   shrink = fp32(x[rows]) @ fp32(a[s, jR : jR + r]).T       [m, r]      per slice j with r = ranks[s, j] > 0
//   acc[:, off_j : off_j + slices[j]] += shrink @ fp32(b[s, off_j : ..., :r]).T
//   out[rows] = round(acc)
//
// Only the slot's own A and B rows are widened to fp32, so the cost follows the adapters in the step, not
// the buffers' S. The GEMMs are rank-sized, so aten's (oneDNN's) are the kernels; a step whose tokens are
// all slot 0 costs one scan of the slots and the copy of y.
#include <c10/util/SmallVector.h>

#include <algorithm>

#include "ops.h"

namespace llmbuild {
namespace {

void check_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& ranks, const at::Tensor& slots, at::IntArrayRef slices) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "lora: x ", x.sizes(), " and y ", y.sizes(),
              " must be [T, in] and [T, out]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(y.scalar_type() == dtype && a.scalar_type() == dtype && b.scalar_type() == dtype,
              "lora: x, y, a, b must share a dtype (x ", dtype, ", y ", y.scalar_type(), ", a ", a.scalar_type(),
              ", b ", b.scalar_type(), ")");
  const int64_t n = static_cast<int64_t>(slices.size());
  TORCH_CHECK(n > 0, "lora: slices is empty");
  int64_t total = 0;
  for (const int64_t w : slices) {
    TORCH_CHECK(w >= 0, "lora: slice width ", w, " is negative");
    total += w;
  }
  TORCH_CHECK(total == y.size(1), "lora: slices sum to ", total, ", y has ", y.size(1), " columns");
  TORCH_CHECK(a.dim() == 3 && a.size(1) % n == 0 && a.size(2) == x.size(1), "lora: a ", a.sizes(),
              " must be [S, ", n, " * R, ", x.size(1), "]");
  const int64_t slots_n = a.size(0), rank_cap = a.size(1) / n;
  TORCH_CHECK(b.dim() == 3 && b.size(0) == slots_n && b.size(1) == total && b.size(2) == rank_cap, "lora: b ",
              b.sizes(), " must be [", slots_n, ", ", total, ", ", rank_cap, "]");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.dim() == 2 && ranks.size(0) == slots_n && ranks.size(1) == n,
              "lora: ranks must be int32 [", slots_n, ", ", n, "]");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.dim() == 1 && slots.size(0) == x.size(0),
              "lora: slots must be int32 [", x.size(0), "]");
}

// Adds slot s's adapter to acc's rows (fp32: the group's rows of y, to be rounded once by the caller).
void add_adapter(const at::Tensor& xf, at::Tensor acc, const at::Tensor& a, const at::Tensor& b, const int32_t* ranks,
                 int64_t s, at::IntArrayRef slices) {
  const int64_t n = static_cast<int64_t>(slices.size()), rank_cap = a.size(1) / n;
  const at::Tensor as = a.select(0, s), bs = b.select(0, s);
  int64_t off = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = ranks[s * n + j], width = slices[j];
    TORCH_CHECK(r >= 0 && r <= rank_cap, "lora: slot ", s, " has rank ", r, " in slice ", j, " (max_rank ",
                rank_cap, ")");
    if (r > 0 && width > 0) {
      const at::Tensor shrink = at::mm(xf, as.narrow(0, j * rank_cap, r).to(at::kFloat).t());  // [m, r]
      acc.narrow(1, off, width).addmm_(shrink, bs.narrow(0, off, width).narrow(1, 0, r).to(at::kFloat).t());
    }
    off += width;
  }
}

}  // namespace

at::Tensor lora(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& ranks, const at::Tensor& slots, at::IntArrayRef slices) {
  check_args(x, y, a, b, ranks, slots, slices);
  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  const at::Tensor slots_c = slots.contiguous();
  const int32_t* sp = slots_c.data_ptr<int32_t>();
  const int64_t tokens = slots_c.size(0), slots_n = a.size(0);
  // keys slot * T + t of the adapted tokens: sorted, they group tokens by slot in token order
  c10::SmallVector<int64_t, 64> keys;
  for (int64_t t = 0; t < tokens; ++t) {
    if (sp[t] != 0) {
      TORCH_CHECK(sp[t] > 0 && sp[t] < slots_n, "lora: token ", t, " has slot ", sp[t], " (slots 0..", slots_n - 1,
                  ")");
      keys.push_back(sp[t] * tokens + t);
    }
  }
  if (keys.empty()) {
    return out;
  }
  std::sort(keys.begin(), keys.end());
  for (int64_t& k : keys) k %= tokens;  // now token indices, grouped by slot
  const at::Tensor ranks_c = ranks.contiguous();
  const int32_t* rp = ranks_c.data_ptr<int32_t>();
  // a view of keys: the index ops read it before this function returns
  const at::Tensor idx = at::from_blob(keys.data(), {static_cast<int64_t>(keys.size())}, at::kLong);
  const at::Tensor xf = x.index_select(0, idx).to(at::kFloat);  // [m, in], the adapted tokens grouped by slot
  at::Tensor acc = out.index_select(0, idx).to(at::kFloat);     // [m, out]; a fresh tensor, also for fp32
  int64_t begin = 0;
  while (begin < static_cast<int64_t>(keys.size())) {
    const int64_t s = sp[keys[begin]];
    int64_t end = begin + 1;
    while (end < static_cast<int64_t>(keys.size()) && sp[keys[end]] == s) ++end;
    add_adapter(xf.narrow(0, begin, end - begin), acc.narrow(0, begin, end - begin), a, b, rp, s, slices);
    begin = end;
  }
  out.index_copy_(0, idx, acc.to(out.scalar_type()));
  return out;
}

}  // namespace llmbuild

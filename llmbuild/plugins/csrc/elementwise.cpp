// Fused row-wise ops: rms_norm, add_rms_norm, rope, swiglu.
//
// Each computes in fp32 but rounds to the activation dtype exactly where transformers' unfused
// ops do (e.g. the normalised row before the weight multiply), so the fused kernels agree with
// the reference bit for bit in bf16 as well as fp32. Rows are parallel; columns vectorise.
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"

namespace llmbuild {
namespace {

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename scalar_t>
void rms_norm_row(const scalar_t* x, const scalar_t* w, scalar_t* out, int64_t d, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    const float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  const float rstd = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    out[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * round_to<scalar_t>(static_cast<float>(x[i]) * rstd));
  }
}

template <typename scalar_t>
void add_rms_norm_row(const scalar_t* x, const scalar_t* res, const scalar_t* w, scalar_t* sum, scalar_t* out,
                      int64_t d, float eps) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) sum[i] = static_cast<scalar_t>(static_cast<float>(x[i]) + static_cast<float>(res[i]));
  rms_norm_row(sum, w, out, d, eps);
}

// transformers: x * cos + rotate_half(x) * sin, each product and the sum in the activation dtype
template <typename scalar_t>
void rope_row(const scalar_t* row, const float* c, const float* s, scalar_t* o, int64_t d) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    const float rot = k < half ? -static_cast<float>(row[k + half]) : static_cast<float>(row[k - half]);
    const float a = round_to<scalar_t>(static_cast<float>(row[k]) * round_to<scalar_t>(c[k]));
    const float b = round_to<scalar_t>(rot * round_to<scalar_t>(s[k]));
    o[k] = static_cast<scalar_t>(a + b);
  }
}

template <typename scalar_t>
void swiglu_row(const scalar_t* gate, const scalar_t* up, scalar_t* o, int64_t inter) {
#pragma omp simd
  for (int64_t k = 0; k < inter; ++k) {
    const float v = static_cast<float>(gate[k]);
    const float act = round_to<scalar_t>(v / (1.f + std::exp(-v)));
    o[k] = static_cast<scalar_t>(act * static_cast<float>(up[k]));
  }
}

void check_norm(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), op, ": weight [", w.size(0), "] does not fit rows of ",
              x.size(-1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x dtype ", x.scalar_type(), " != weight dtype ",
              w.scalar_type());
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight, "rms_norm");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int64_t d = x.size(-1), rows = xc.numel() / std::max<int64_t>(d, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) rms_norm_row(xp + r * d, wp, op + r * d, d, static_cast<float>(eps));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm(x, weight, "add_rms_norm");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "add_rms_norm: residual ", residual.sizes(), " does not match x ", x.sizes());
  const auto xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  auto sum = at::empty_like(xc), out = at::empty_like(xc);
  const int64_t d = x.size(-1), rows = xc.numel() / std::max<int64_t>(d, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* rp = rc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        add_rms_norm_row(xp + r * d, rp + r * d, wp, sp + r * d, op + r * d, d, static_cast<float>(eps));
      }
    });
  });
  return {out, sum};
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  // x: [T, H, D]; positions: [T] int64; cos, sin: [max_len, D] fp32 (halves duplicated)
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope: x must be [T, heads, D] with contiguous D");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == x.size(0) && positions.scalar_type() == at::kLong,
              "rope: positions must be int64 [", x.size(0), "]");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == x.size(2) &&
                  cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "rope: cos/sin must be contiguous fp32 [max_len, ", x.size(2), "]");
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), max_len = cos.size(0);
  const auto pos_t = positions.contiguous();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < max_len, "rope: position ", pos[i], " outside the table of ", max_len);
  }
  auto out = at::empty({t, h, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    at::parallel_for(0, t * h, 16, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) {
        const int64_t i = it / h, j = it % h;
        rope_row(xp + i * s0 + j * s1, cp + pos[i] * d, sp + pos[i] * d, op + it * d, d);
      }
    });
  });
  return out;
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  // gate_up: [..., 2I] = [gate | up] -> silu(gate) * up: [..., I]
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "swiglu: last dim ", gate_up.size(-1), " is not even");
  const auto g = gate_up.contiguous();
  const int64_t two_i = g.size(-1), inter = two_i / 2, rows = g.numel() / std::max<int64_t>(two_i, 1);
  auto shape = g.sizes().vec();
  shape.back() = inter;
  auto out = at::empty(shape, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        swiglu_row(gp + r * two_i, gp + r * two_i + inter, op + r * inter, inter);
      }
    });
  });
  return out;
}

}  // namespace llmbuild

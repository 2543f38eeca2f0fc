// inner_attention: input checks shared by its CPU (csrc/cpu/inner_attention.cpp) and CUDA
// (csrc/cuda/inner_attention.cu) backends.
#pragma once
#include "tntkernels/checks.h"

namespace tntkernels {

// Checks shared by every backend of inner_attention: q, k (S, H, m, d); v (S, H, m, dv).
inline void check_inner_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TNT_CHECK_DIM(q, 4, "(S, H, m, d)");
  TNT_CHECK_DIM(k, 4, "(S, H, m, d)");
  TNT_CHECK_DIM(v, 4, "(S, H, m, dv)");
  TNT_CHECK_FLOAT(q);
  TNT_CHECK_SAME_DTYPE(k, q);
  TNT_CHECK_SAME_DTYPE(v, q);
  TNT_CHECK_DEVICE(k, q.device());
  TNT_CHECK_DEVICE(v, q.device());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape (S, H, m, d) = ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must have shape (S, H, m, dv) with (S, H, m) of q ", q.sizes(), ", got ", v.sizes());
}

inline void check_inner_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& out, const at::Tensor& lse) {
  check_inner_attention_inputs(q, k, v);
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "grad_out must have shape (S, H, m, dv) = ", v.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == v.sizes(), "out must have shape (S, H, m, dv) = ", v.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must have shape (S, H, m) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  TNT_CHECK_SAME_DTYPE(grad_out, q);
  TNT_CHECK_SAME_DTYPE(out, q);
  TORCH_CHECK(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "lse must be float32 (float64 for float64 inputs), got ", lse.scalar_type());
  TNT_CHECK_DEVICE(grad_out, q.device());
  TNT_CHECK_DEVICE(out, q.device());
  TNT_CHECK_DEVICE(lse, q.device());
}

}  // namespace tntkernels

// nested_attention: input checks and host helpers shared by its CPU (csrc/cpu/nested_attention.cpp) and
// CUDA (csrc/cuda/nested_attention.cu) backends.
#pragma once
#include <vector>

#include "tntkernels/checks.h"

namespace tntkernels {

// t (optional) must be (B, H, T, T) for q (B, H, T, d), in q's dtype, on q's device; `name` names it.
inline void check_square_logits(const at::Tensor& q, const c10::optional<at::Tensor>& opt, const char* name) {
  if (!opt.has_value()) return;
  const at::Tensor& t = *opt;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == T && t.size(3) == T, name,
              " must have shape (B, H, T, T) = (", B, ", ", H, ", ", T, ", ", T, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " must be on ", q.device(), ", got ", t.device());
}

// Checks shared by every backend of nested_attention: q, k (B, H, T, d); v (B, H, T, dv); prev_logits,
// noise (B, H, T, T); head_mlp empty or the six tensors for H.
inline void check_nested_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& prev, at::TensorList head_mlp,
                                          const c10::optional<at::Tensor>& noise) {
  TNT_CHECK_DIM(q, 4, "(B, H, T, d)");
  TNT_CHECK_DIM(k, 4, "(B, H, T, d)");
  TNT_CHECK_DIM(v, 4, "(B, H, T, dv)");
  TNT_CHECK_FLOAT(q);
  TNT_CHECK_SAME_DTYPE(k, q);
  TNT_CHECK_SAME_DTYPE(v, q);
  TNT_CHECK_DEVICE(k, q.device());
  TNT_CHECK_DEVICE(v, q.device());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape (B, H, T, d) = ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must have shape (B, H, T, dv) with (B, H, T) of q ", q.sizes(), ", got ", v.sizes());
  const int64_t H = q.size(1);
  check_square_logits(q, prev, "prev_logits");
  check_square_logits(q, noise, "noise");
  TORCH_CHECK(head_mlp.empty() || head_mlp.size() == 6,
              "head_mlp must be empty or 6 tensors (w1, b1, w2, b2, w3, b3), got ", head_mlp.size());
  if (head_mlp.size() == 6) {
    const char* names[6] = {"w1", "b1", "w2", "b2", "w3", "b3"};
    const std::vector<std::vector<int64_t>> shapes = {{4 * H, H}, {4 * H}, {4 * H, 4 * H}, {4 * H}, {H, 4 * H}, {H}};
    for (int n = 0; n < 6; ++n) {
      const at::Tensor& t = head_mlp[n];
      TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[n]), "head_mlp.", names[n], " must have shape ",
                  at::IntArrayRef(shapes[n]), " for H = ", H, ", got ", t.sizes());
      TORCH_CHECK(t.scalar_type() == q.scalar_type(), "head_mlp.", names[n], " has dtype ", t.scalar_type(),
                  " but q has ", q.scalar_type());
      TORCH_CHECK(t.device() == q.device(), "head_mlp.", names[n], " must be on ", q.device(), ", got ",
                  t.device());
    }
  }
}

// ... and of its backward: grad_out, out like v; grad_logits and noise like prev_logits; lse (B, H, T) float32
// (float64 for float64 inputs).
inline void check_nested_attention_backward_inputs(const at::Tensor& grad_out,
                                                   const c10::optional<at::Tensor>& grad_logits, const at::Tensor& q,
                                                   const at::Tensor& k, const at::Tensor& v,
                                                   const c10::optional<at::Tensor>& prev, at::TensorList head_mlp,
                                                   const c10::optional<at::Tensor>& noise, const at::Tensor& out,
                                                   const at::Tensor& lse) {
  check_nested_attention_inputs(q, k, v, prev, head_mlp, noise);
  check_square_logits(q, grad_logits, "grad_logits");
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "grad_out must have shape (B, H, T, dv) = ", v.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == v.sizes(), "out must have shape (B, H, T, dv) = ", v.sizes(), ", got ", out.sizes());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T,
              "lse must have shape (B, H, T) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  TNT_CHECK_SAME_DTYPE(grad_out, q);
  TNT_CHECK_SAME_DTYPE(out, q);
  TORCH_CHECK(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "lse must be float32 (float64 for float64 inputs), got ", lse.scalar_type());
  TNT_CHECK_DEVICE(grad_out, q.device());
  TNT_CHECK_DEVICE(out, q.device());
  TNT_CHECK_DEVICE(lse, q.device());
}

// Appends the head-MLP weight gradients [dw1, db1, dw2, db2, dw3, db3] to `grads`: consecutive slices of
// `total` (their flat concatenation) shaped like the weights, as `dtype`.
inline void append_head_mlp_grads(std::vector<at::Tensor>& grads, const at::Tensor& total, at::TensorList head_mlp,
                                  at::ScalarType dtype) {
  int64_t off = 0;
  for (const auto& w : head_mlp) {
    grads.push_back(total.narrow(0, off, w.numel()).view(w.sizes()).to(dtype).clone());
    off += w.numel();
  }
}

}  // namespace tntkernels

// Operator schemas of the tntkernels library, and the Python module that loads them.
//
// One TORCH_LIBRARY block declares every op; each backend registers its kernels with
// TORCH_LIBRARY_IMPL(tntkernels, <DispatchKey>, m) in csrc/<device>/<family>.{cpp,cu}. The fake
// (meta) kernels and autograd formulas are registered from Python (tntkernels/ops/<family>.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "tntkernels/grid_cap.h"
#include "tntkernels/limits.h"

TORCH_LIBRARY(tntkernels, m) {
  // softmax(q kᵀ · scale) v over (S, H, m, d) sequences; returns out (S, H, m, dv) and the row
  // log-sum-exp lse (S, H, m) in float32 (float64 for float64 inputs), saved for backward.
  m.def("inner_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Gradients of inner_attention with respect to q, k and v, from the saved out and lse.
  m.def(
      "inner_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  // Nested-logit attention (CODA / RealFormer) over (B, H, T, d) sequences: S = scale q kᵀ (+ prev_logits);
  // Z = S + head-MLP(S) when prev_logits is given and head_mlp holds the six tensors (w1 (4H, H), b1 (4H),
  // w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)), else Z = S; Z += noise; out = softmax(Z) v. Returns out
  // (B, H, T, dv), the logits Z (B, H, T, T) for the next layer and lse (B, H, T) in float32 (float64 for
  // float64 inputs), saved for backward. head_mlp is [] (RealFormer) or the six tensors.
  m.def(
      "nested_attention(Tensor q, Tensor k, Tensor v, Tensor? prev_logits, Tensor[] head_mlp, Tensor? noise, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  // Gradients of nested_attention from the saved out and lse; grad_logits may be None (zero). The logits are
  // recomputed from the forward's inputs (noise included) in the accumulation type (float32; float64 for
  // float64), as the forward computed them before rounding to q's dtype, so P = exp(Z − lse) is the
  // forward's softmax in every dtype.
  // Returns [dq, dk, dv, dprev] (dprev has 0 elements when prev_logits is None), followed by the six MLP
  // gradients [dw1, db1, dw2, db2, dw3, db3] only when the MLP was used (prev_logits given, head_mlp non-empty).
  m.def(
      "nested_attention_backward(Tensor grad_out, Tensor? grad_logits, Tensor q, Tensor k, Tensor v, "
      "Tensor? prev_logits, Tensor[] head_mlp, Tensor? noise, Tensor out, Tensor lse, float scale) -> Tensor[]");
  // TinT's H_sim-split linear map on x (N, D), D = H·d (docs/tint.md §1):
  //   mix:   z[n, g, k] = Σ_h x[n, h, k] M[k, h, g] + m[k, g]     mix_weight M (d, H, H), mix_bias m (d, H)
  //   block: y[n, g, :] = z[n, g, :] @ A[g] + a[g]               block_weight A (H, d, d), block_bias a (H, d)
  // Either part may be absent (its weight None; a bias only with its weight). Returns y (N, D), x's dtype.
  m.def(
      "hsim_split_linear(Tensor x, Tensor? mix_weight, Tensor? mix_bias, Tensor? block_weight, "
      "Tensor? block_bias) -> Tensor");
  // Gradients of hsim_split_linear: [dx, dM, dm, dA, da], x's / the weights' shapes, 0-element tensors for
  // absent parameters. Deterministic (no atomics).
  m.def(
      "hsim_split_linear_backward(Tensor grad_y, Tensor x, Tensor? mix_weight, Tensor? mix_bias, "
      "Tensor? block_weight, Tensor? block_bias) -> Tensor[]");
}

#ifndef TNTKERNELS_CUDA_ARCHS
#define TNTKERNELS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tntkernels compiled ops: registers torch.ops.tntkernels.*";
  module.def("cuda_compiled", []() {
#ifdef TNTKERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when this build holds the CUDA kernels.");
  module.def("cuda_archs", []() { return std::string(TNTKERNELS_CUDA_ARCHS); },
             "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for ('' for a CPU-only build).");
  module.def("_set_grid_cap_for_tests", [](int64_t blocks) {
    TORCH_CHECK(blocks >= 0, "_set_grid_cap_for_tests: blocks must be >= 0, got ", blocks);
    return tntkernels::cuda::grid_cap_for_tests().exchange(blocks);
  }, "Tests only: cap every grid-stride CUDA kernel's grid at `blocks` (0: no cap); returns the previous cap.");
  module.def("limits", []() {
    namespace L = tntkernels::limits;
    pybind11::dict d;
    d["inner_attention.cuda.max_head_dim"] = L::inner_attention_cuda::kMaxHeadDim;
    d["inner_attention.cuda.max_tokens"] = L::inner_attention_cuda::kMaxTokens;
    d["inner_attention.cuda.max_rows"] = L::inner_attention_cuda::kMaxRows;
    d["nested_attention.cuda.max_tokens"] = L::nested_attention_cuda::kMaxTokens;
    d["nested_attention.cuda.max_heads"] = L::nested_attention_cuda::kMaxHeads;
    d["nested_attention.cuda.max_head_dim"] = L::nested_attention_cuda::kMaxHeadDim;
    d["hsim_split_linear.cuda.max_heads"] = L::hsim_split_cuda::kMaxHeads;
    d["hsim_split_linear.cuda.max_head_dim"] = L::hsim_split_cuda::kMaxHeadDim;
    return d;
  }, "The size limits of the CUDA kernels (csrc/include/tntkernels/limits.h), {'<op>.cuda.<what>': int}; "
     "the same in every build, CUDA compiled or not.");
}

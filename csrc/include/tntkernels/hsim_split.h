// hsim_split_linear: input checks and host helpers shared by its CPU (csrc/cpu/hsim_split.cpp) and CUDA
// (csrc/cuda/hsim_split.cu) backends.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "tntkernels/checks.h"

namespace tntkernels {

// Checks shared by every backend of hsim_split_linear: x (N, D) with D = H·d, mix_weight (d, H, H),
// mix_bias (d, H), block_weight (H, d, d), block_bias (H, d); returns (H, d).
inline std::pair<int64_t, int64_t> check_hsim_split_inputs(const at::Tensor& x,
                                                           const c10::optional<at::Tensor>& mix_weight,
                                                           const c10::optional<at::Tensor>& mix_bias,
                                                           const c10::optional<at::Tensor>& block_weight,
                                                           const c10::optional<at::Tensor>& block_bias) {
  TORCH_CHECK(x.dim() == 2, "hsim_split_linear: x must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat ||
                  x.scalar_type() == at::kDouble,
              "hsim_split_linear: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(mix_weight.has_value() || !mix_bias.has_value(), "hsim_split_linear: mix_bias given without mix_weight");
  TORCH_CHECK(block_weight.has_value() || !block_bias.has_value(),
              "hsim_split_linear: block_bias given without block_weight");
  const std::pair<const c10::optional<at::Tensor>*, const char*> all[4] = {
      {&mix_weight, "mix_weight"}, {&mix_bias, "mix_bias"}, {&block_weight, "block_weight"}, {&block_bias, "block_bias"}};
  for (const auto& [opt, name] : all) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = **opt;
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "hsim_split_linear: ", name, " has dtype ", t.scalar_type(),
                " but x has ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "hsim_split_linear: ", name, " must be on ", x.device(), " like x, got ",
                t.device());
  }
  const int64_t D = x.size(1);
  int64_t H = 1, d = D;
  if (mix_weight.has_value()) {
    const at::Tensor& M = *mix_weight;
    TORCH_CHECK(M.dim() == 3 && M.size(1) == M.size(2), "hsim_split_linear: mix_weight must be 3-D (d, H, H), got shape ",
                M.sizes());
    H = M.size(1);
    d = M.size(0);
  } else if (block_weight.has_value()) {
    const at::Tensor& A = *block_weight;
    TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2),
                "hsim_split_linear: block_weight must be 3-D (H, d, d), got shape ", A.sizes());
    H = A.size(0);
    d = A.size(1);
  }
  TORCH_CHECK(H * d == D, "hsim_split_linear: x's last dim D=", D, " must equal H·d = ", H, "·", d,
              " from the weights");
  if (block_weight.has_value())
    TORCH_CHECK(block_weight->sizes() == at::IntArrayRef({H, d, d}), "hsim_split_linear: block_weight must have shape (H, d, d) = (",
                H, ", ", d, ", ", d, "), got ", block_weight->sizes());
  if (mix_bias.has_value())
    TORCH_CHECK(mix_bias->sizes() == at::IntArrayRef({d, H}), "hsim_split_linear: mix_bias must have shape (d, H) = (", d,
                ", ", H, "), got ", mix_bias->sizes());
  if (block_bias.has_value())
    TORCH_CHECK(block_bias->sizes() == at::IntArrayRef({H, d}), "hsim_split_linear: block_bias must have shape (H, d) = (",
                H, ", ", d, "), got ", block_bias->sizes());
  return {H, d};
}

inline void check_hsim_split_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "hsim_split_linear_backward: grad_y must have x's shape (N, D) = ",
              x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "hsim_split_linear_backward: grad_y has dtype ",
              grad_y.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), "hsim_split_linear_backward: grad_y must be on ", x.device(), ", got ",
              grad_y.device());
}

// The outputs of hsim_split_linear_backward, allocated like x: [dx (N, D), dM (d, H, H), dm (d, H),
// dA (H, d, d), da (H, d)], a 0-element tensor for each absent parameter. With nothing to sum over
// (N = 0 or D = 0) the weight gradients are zero-filled here (gradients of empty sums).
inline std::vector<at::Tensor> hsim_split_grad_outputs(const at::Tensor& x, int64_t H, int64_t d, bool mix,
                                                       bool has_mix_bias, bool block, bool has_block_bias) {
  const auto empty = [&] { return at::empty({0}, x.options()); };
  std::vector<at::Tensor> grads = {at::empty_like(x, at::MemoryFormat::Contiguous),
                                   mix ? at::empty({d, H, H}, x.options()) : empty(),
                                   has_mix_bias ? at::empty({d, H}, x.options()) : empty(),
                                   block ? at::empty({H, d, d}, x.options()) : empty(),
                                   has_block_bias ? at::empty({H, d}, x.options()) : empty()};
  if (x.size(0) == 0 || H * d == 0)
    for (size_t i = 1; i < grads.size(); ++i) grads[i].zero_();
  return grads;
}

}  // namespace tntkernels

// Operator schemas of the tntkernels library, and the Python module that loads them.
//
// One TORCH_LIBRARY block declares every op; each backend registers its kernels with
// TORCH_LIBRARY_IMPL(tntkernels, <DispatchKey>, m) in csrc/<device>/<family>.{cpp,cu}. The fake
// (meta) kernels and autograd formulas are registered from Python (tntkernels/ops/<family>.py).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(tntkernels, m) {
  // softmax(q kᵀ · scale) v over (S, H, m, d) sequences; returns out (S, H, m, dv) and the row
  // log-sum-exp lse (S, H, m) in float32 (float64 for float64 inputs), saved for backward.
  m.def("inner_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Gradients of inner_attention with respect to q, k and v, from the saved out and lse.
  m.def(
      "inner_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
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
}

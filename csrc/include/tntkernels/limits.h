// The size limits of the CUDA kernels, one constexpr each: the kernels size their register / shared
// arrays and check their inputs with these, and tntkernels._C.limits() hands them to Python under the
// name in each comment. Plain C++ (no CUDA or torch headers), so a CPU-only build exports them too.
// The CPU backends have no such limits.
#pragma once
#include <cstdint>
#include <limits>

namespace tntkernels {
namespace limits {

// inner_attention (csrc/cuda/inner_attention.cu): the inner level of TNT / RTNT, a block holds whole
// (sequence, head) pairs in shared memory.
namespace inner_attention_cuda {
constexpr int64_t kMaxHeadDim = 64;  // "inner_attention.cuda.max_head_dim": d, dv
constexpr int64_t kMaxTokens = 64;   // "inner_attention.cuda.max_tokens": m
// "inner_attention.cuda.max_rows": S·H·m, so that pair and row indices are 32-bit.
constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
}  // namespace inner_attention_cuda

// nested_attention (csrc/cuda/nested_attention.cu): one block per sequence, per-position arrays over heads.
namespace nested_attention_cuda {
constexpr int64_t kMaxTokens = 64;   // "nested_attention.cuda.max_tokens": T
constexpr int64_t kMaxHeads = 16;    // "nested_attention.cuda.max_heads": H (head-MLP width 4H)
constexpr int64_t kMaxHeadDim = 64;  // "nested_attention.cuda.max_head_dim": d and dv
}  // namespace nested_attention_cuda

// hsim_split_linear (csrc/cuda/hsim_split.cu): the mix kernel stages, per tile of 32 coordinates k, the H × (4 to
// 16) mix weights of its outputs in shared memory (at most 66 KB at H = 64). The head GEMMs are cuBLAS's and
// need no limit on d; d <= 256 is the supported, tested range.
namespace hsim_split_cuda {
constexpr int64_t kMaxHeads = 64;     // "hsim_split_linear.cuda.max_heads": H
constexpr int64_t kMaxHeadDim = 256;  // "hsim_split_linear.cuda.max_head_dim": d
}  // namespace hsim_split_cuda

}  // namespace limits
}  // namespace tntkernels

// Launch helpers shared by the CUDA kernels (csrc/cuda/*.cu): grid sizes, grid-stride loops, the
// device guard + current stream of an op, and kernel launches checked with C10_CUDA_KERNEL_LAUNCH_CHECK.
// Every grid is 1-D on axis x (never y / z, whose 65,535 limit a large batch would hit).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "tntkernels/grid_cap.h"

namespace tntkernels {
namespace cuda {

// Most blocks of a capped grid. Kernels launched on one walk their work items with the stride loops
// below; the grid depends on the shapes only, so results do not depend on the cap.
constexpr int64_t kMaxGridBlocks = 1 << 20;
// Dynamic shared memory a kernel may use without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr int64_t kDefaultDynamicSmemBytes = 48 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `items` work items, `per_block` per block: ceil(items / per_block), at least 1, at most max_blocks
// (and at most the test-only cap of grid_cap.h when set).
inline unsigned int capped_grid(int64_t items, int64_t per_block, int64_t max_blocks = kMaxGridBlocks) {
  const int64_t test_cap = grid_cap_for_tests().load(std::memory_order_relaxed);
  if (test_cap > 0) max_blocks = std::min(max_blocks, test_cap);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, per_block), max_blocks)));
}

// The current CUDA device set to t's for the scope (c10::cuda::CUDAGuard), and that device's current stream.
class DeviceScope {
 public:
  explicit DeviceScope(const at::Tensor& t) : guard_(t.device()), stream_(at::cuda::getCurrentCUDAStream()) {}
  cudaStream_t stream() const { return stream_; }

 private:
  c10::cuda::CUDAGuard guard_;  // declared (so constructed) before stream_
  cudaStream_t stream_;
};

// Lets `kernel` use `bytes` of dynamic shared memory when that is over the default 48 KB.
template <typename... Params>
void allow_dynamic_smem(void (*kernel)(Params...), int64_t bytes) {
  if (bytes > kDefaultDynamicSmemBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// kernel<<<grid, threads, smem_bytes, stream>>>(args...), then C10_CUDA_KERNEL_LAUNCH_CHECK (raises on a
// launch error).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int threads, size_t smem_bytes, cudaStream_t stream,
            Args&&... args) {
  kernel<<<grid, threads, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Index of this thread in the whole grid.
__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

}  // namespace cuda
}  // namespace tntkernels

// for (i = this thread's grid index; i < n; i += threads in the grid): one element per thread per step.
#define TNT_GRID_STRIDE_LOOP(i, n)                                                           \
  for (int64_t i = ::tntkernels::cuda::global_thread_index(); i < (n);                       \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
// for (item = blockIdx.x; item < n; item += gridDim.x): one work item per block per step.
#define TNT_BLOCK_STRIDE_LOOP(item, n) for (int64_t item = blockIdx.x; item < (n); item += gridDim.x)

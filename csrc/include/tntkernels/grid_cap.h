// A test-only cap on the grid of every CUDA kernel that walks its work with a grid-stride loop
// (cuda_utils.h: capped_grid), so that small test inputs exercise those loops. 0 (the default) = no cap.
// Set from Python with tntkernels._C._set_grid_cap_for_tests(n); no CUDA header needed here, so the
// host-only module file can include it. One instance per extension (an inline function's static).
#pragma once
#include <atomic>
#include <cstdint>

namespace tntkernels {
namespace cuda {

inline std::atomic<int64_t>& grid_cap_for_tests() {
  static std::atomic<int64_t> cap{0};
  return cap;
}

}  // namespace cuda
}  // namespace tntkernels

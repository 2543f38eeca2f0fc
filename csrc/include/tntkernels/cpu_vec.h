// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): the ISA clones of the float hot paths, forced
// inlining, GCC vector types of 64 bytes and small element-wise loops that vectorize.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

// TNT_TARGET_CLONES compiles a function once per ISA level and picks one when the library is loaded
// (GCC's target_clones: an ifunc resolver reads the CPU's features). One ISA list for every op:
//   arch=x86-64-v4  AVX-512 (F/BW/CD/DQ/VL): the 64-byte vectors below are one zmm register;
//   arch=x86-64-v3  AVX2 + FMA (+ BMI, F16C): practically every x86 server of the last decade;
//   default         baseline x86-64 (SSE2), so the library still loads on any x86-64 CPU.
// GCC accepts the x86-64-vN levels as target_clones values (and detects them at run time) from GCC 12
// on; older GCC gets the nearest list it knows, ("avx2", "default"). Clang's target_clones differs
// (and other architectures have no such levels): there the functions are compiled once, for the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TNT_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TNT_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TNT_TARGET_CLONES
#endif

// Forces inlining, so that a helper called from a TNT_TARGET_CLONES function is compiled for each clone's ISA.
#define TNT_INLINE inline __attribute__((always_inline))

namespace tntkernels {

// GCC vector types of 64 bytes (16 floats / 8 doubles): one zmm register in the x86-64-v4 clone, two ymm
// in the v3 clone, four xmm in the baseline one. aligned(sizeof(T)) and may_alias: loads and stores
// through them need only element alignment.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64), aligned(4), may_alias));
  static constexpr int C = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64), aligned(8), may_alias));
  static constexpr int C = 8;
};

template <typename T>
TNT_INLINE typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
TNT_INLINE void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

// The elements of t (any device, layout or dtype) as a std::vector<T> in row-major order.
template <typename T>
std::vector<T> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.contiguous().to(at::kCPU, c10::CppTypeToScalarType<T>::value);
  const T* p = c.data_ptr<T>();
  return std::vector<T>(p, p + c.numel());
}

// dst[0:n) = src[0:n) converted (e.g. float16 / bfloat16 inputs into the float accumulation type).
template <typename src_t, typename dst_t>
inline void load(const src_t* src, dst_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<dst_t>(src[j]);
}
// dst[0:n) = src[0:n) converted back to the output dtype.
template <typename src_t, typename dst_t>
inline void store(const src_t* src, dst_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<dst_t>(src[j]);
}

// y[0:n) += a · x[0:n), in fixed blocks of 8 that the compiler turns into single vector FMAs.
template <typename acc_t>
TNT_INLINE void axpy(acc_t* __restrict__ y, acc_t a, const acc_t* __restrict__ x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) y[j + t] += a * x[j + t];
  }
  for (; j < n; ++j) y[j] += a * x[j];
}

// Σ_j a[j] b[j] over [0:n), summed in increasing j.
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t s = 0;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace tntkernels

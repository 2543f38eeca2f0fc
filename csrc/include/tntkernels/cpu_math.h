// Branch-free float exp / log and the 16-lane tile helpers shared by the CPU attention kernels
// (csrc/cpu/inner_attention.cpp, csrc/cpu/nested_attention.cpp). Every function is forced inline, so a
// TNT_TARGET_CLONES caller compiles it for each ISA level.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "tntkernels/cpu_vec.h"

namespace tntkernels {

// exp(x) for float without branches, so loops over it vectorize: Cody-Waite range reduction
// x = n·ln2 + r, |r| ≤ ln2/2, and a degree-6 polynomial for e^r (Cephes expf coefficients; relative
// error ≈ 1e-7). exp(−inf) = 0, exp(+inf) = +inf, NaN propagates. The selects if-convert (and
// the loop vectorizes) only with -fno-trapping-math, which setup.py passes; it changes no values.
TNT_INLINE float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float xc = x > lo ? x : lo;
  xc = xc < hi ? xc : hi;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
// log(x) for float without branches (Cephes logf: x = f·2^e with f in [√½, √2), a degree-9
// polynomial in f − 1; relative error ≈ 1e-7). log(0) = −inf, log(+inf) = +inf, NaN and x < 0 give
// NaN. Subnormal x is treated as 0 (the softmax sums it serves are 0 or >= 1).
TNT_INLINE float log_f32(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // the mantissa as f in [0.5, 1)
  float f;
  std::memcpy(&f, &mbits, sizeof(f));
  const bool small = f < 0.707106781186547524f;
  e = small ? e - 1 : e;
  f = small ? f + f - 1.0f : f - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = f + y + fe * 0.693359375f;
  r = x < 1.17549435e-38f ? -std::numeric_limits<float>::infinity() : r;  // 0 and subnormals
  r = x == std::numeric_limits<float>::infinity() ? x : r;
  r = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : r;
  return x != x ? x : r;
}
TNT_INLINE double exp_acc(double x) { return std::exp(x); }
TNT_INLINE float exp_acc(float x) { return exp_f32(x); }
TNT_INLINE double log_acc(double x) { return std::log(x); }
TNT_INLINE float log_acc(float x) { return log_f32(x); }

// ---- 16-lane tiles: one GCC vector of 16 floats (Vec<float>) per row of a 16 × 16 tile ----------------
constexpr int64_t kM = 16;
using V16 = Vec<float>::type;
static_assert(Vec<float>::C == kM, "one vector per tile row");

// dst[c][i] = src[i·cols + c]·mul: the transpose of a (16 × cols) row-major block.
TNT_INLINE void load_t16(const float* __restrict__ src, float (*__restrict__ dst)[kM], int64_t cols, float mul) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t i = 0; i < kM; ++i) dst[c][i] = src[i * cols + c] * mul;
}
// dst[i·cols + c] = src[c][i].
TNT_INLINE void store_t16(const float (*__restrict__ src)[kM], float* __restrict__ dst, int64_t cols) {
  for (int64_t i = 0; i < kM; ++i)
    for (int64_t c = 0; c < cols; ++c) dst[i * cols + c] = src[c][i];
}
// The 16 × 16 tile a (one vector per row) transposed in registers: four butterfly stages, each
// swapping the off-diagonal B × B blocks of every 2B × 2B block with one two-input shuffle per row
// (a vpermt2ps each in the AVX-512 clone).
using I16 = int32_t __attribute__((vector_size(64)));
#if defined(__GNUC__) && !defined(__clang__)
template <int B>
TNT_INLINE void transpose_stage(V16* a) {
  I16 lo, hi;
  for (int l = 0; l < kM; ++l) {
    lo[l] = (l & B) ? kM + l - B : l;
    hi[l] = (l & B) ? kM + l : l + B;
  }
  for (int r = 0; r < kM; ++r) {
    if (r & B) continue;
    const V16 x = a[r], y = a[r + B];
    a[r] = __builtin_shuffle(x, y, lo);
    a[r + B] = __builtin_shuffle(x, y, hi);
  }
}
TNT_INLINE void transpose16(V16* a) {
  transpose_stage<8>(a);
  transpose_stage<4>(a);
  transpose_stage<2>(a);
  transpose_stage<1>(a);
}
#else  // other compilers (clang's __builtin_shufflevector wants constant indices): through memory
TNT_INLINE void transpose16(V16* a) {
  alignas(64) float t[kM][kM];
  for (int64_t i = 0; i < kM; ++i) vstore(t[i], a[i]);
  for (int64_t i = 0; i < kM; ++i) {
    alignas(64) float row[kM];
    for (int64_t j = 0; j < kM; ++j) row[j] = t[j][i];
    a[i] = vload(row);
  }
}
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The fixed-D (D <= 16) forms of load_t16 / store_t16, through registers: the 16 rows of D floats are
// loaded as 16-lane vectors (a row's spare lanes hold the next rows' floats), transposed with
// transpose16 and the first D vectors kept; the scalar forms above move one float at a time and then
// reload the tile as vectors, which the CPU cannot forward from the scalar stores. No access leaves
// the block's 16·D floats: the rows whose 16 lanes would run past its end are taken from the block's
// last 16 floats, shifted. Values are the same as load_t16's / store_t16's (moves only, and the same
// product by mul).
template <int64_t D>
TNT_INLINE V16 row16(const float* __restrict__ src, int64_t i) {
  if (D * i + kM <= kM * D) return vload(src + D * i);
  const int64_t off = D * i - (kM * D - kM);  // row i's first float in the last 16
  I16 idx;
  for (int l = 0; l < kM; ++l) idx[l] = static_cast<int32_t>((l + off) & (kM - 1));
  return __builtin_shuffle(vload(src + kM * D - kM), idx);
}
template <int64_t D>
TNT_INLINE void load_t16_fixed(const float* __restrict__ src, float (*__restrict__ dst)[kM], float mul) {
  static_assert(D > 0 && D <= kM, "one transposed tile");
  V16 a[kM];
  for (int64_t i = 0; i < kM; ++i) a[i] = row16<D>(src, i);
  transpose16(a);
  for (int64_t c = 0; c < D; ++c) vstore(dst[c], a[c] * mul);
}
// dst[i·D + c] = src[c][i]: rows stored as whole vectors in increasing i, each overwriting the spare
// lanes its predecessor wrote (all inside the block, which one task owns); the rows that would run
// past the block's end go out float by float.
template <int64_t D>
TNT_INLINE void store_t16_fixed(const float (*__restrict__ src)[kM], float* __restrict__ dst) {
  static_assert(D > 0 && D <= kM, "one transposed tile");
  V16 a[kM];
  for (int64_t c = 0; c < D; ++c) a[c] = vload(src[c]);
  for (int64_t c = D; c < kM; ++c) a[c] = V16{};
  transpose16(a);  // a[i]: row i in lanes [0, D)
  for (int64_t i = 0; i < kM; ++i) {
    if (D * i + kM <= kM * D) {
      vstore(dst + D * i, a[i]);
    } else {  // the last rows: D floats each (a whole vector would run past the block)
      for (int64_t c = 0; c < D; ++c) dst[D * i + c] = a[i][c];
    }
  }
}
#else
template <int64_t D>
TNT_INLINE void load_t16_fixed(const float* __restrict__ src, float (*__restrict__ dst)[kM], float mul) {
  load_t16(src, dst, D, mul);
}
template <int64_t D>
TNT_INLINE void store_t16_fixed(const float (*__restrict__ src)[kM], float* __restrict__ dst) {
  store_t16(src, dst, D);
}
#endif

}  // namespace tntkernels

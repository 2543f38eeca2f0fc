// TinT's H_sim-split linear op on CPU (docs/tint.md §1; tntkernels/ops/hsim_split.py).
//
// x (N, D), D = H·d, a row viewed as x[h, k]:
//   mix:   z[n, g, k] = Σ_h x[n, h, k] M[k, h, g] + m[k, g]       M (d, H, H), m (d, H)
//   block: y[n, g, :] = z[n, g, :] @ A[g] + a[g]                   A (H, d, d), a (H, d)
// Either part may be absent (z = x without the mix, y = z without the block).
//   backward: dz = dy A[g]ᵀ (dz = dy without the block);  dx[n, h, k] = Σ_g dz[n, g, k] M[k, h, g] (dx = dz
//             without the mix);  dA[g] = Σ_n z[n, g, :]ᵀ dy[n, g, :];  da = Σ_n dy;
//             dM[k, h, g] = Σ_n x[n, h, k] dz[n, g, k];  dm = Σ_n dz.
//
// Everything is computed in the accumulation type (float for float16 / bfloat16 / float32, double for
// float64). The weights are packed once per call: Mt[h][g][:] = M[:, h, g] (and its (g, h) transpose for
// dx), A and Aᵀ per head, so every inner loop runs over a contiguous coordinate axis. The per-row parts
// (mix, the H (rows × d)·(d × d) products, dz, dx) run over fixed tiles of kRows rows with
// at::parallel_for; the products use a register-blocked kernel (6 rows × 16 floats or 8 doubles) compiled for
// each ISA level of TNT_TARGET_CLONES (x86-64-v4 / v3 / baseline, chosen at load time).
// Weight gradients: each output element belongs to exactly one task, which sums over all N rows in
// increasing row order (dA: tasks (head g, block of kWgradRows rows of A[g]), over row blocks of kNBlock;
// dM: one task per head h; da, dm: one task each). No atomics, no thread-count-dependent splitting:
// the results are bitwise identical for any number of threads.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "tntkernels/cpu_vec.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/hsim_split.h"

namespace tntkernels {

namespace {

constexpr int64_t kRows = 32;       // rows per task of the per-row parts
constexpr int64_t kNBlock = 128;    // rows per step of the dA reduction
constexpr int64_t kWgradRows = 32;  // rows of A[g] per dA task

// Register-blocked products use the 64-byte GCC vector types Vec<T> (cpu_vec.h): 16 floats / 8 doubles.
constexpr int kMicroRows = 6;

// c (R × C) += a (R × K; row r at a + r·lda, contiguous over K) · b (K × C; row k at b + k·ldb), where
// C is one vector; the R accumulators stay in registers.
template <typename T, int R>
TNT_INLINE void micro(int64_t K, const T* __restrict__ a, int64_t lda, const T* __restrict__ b, int64_t ldb,
                      T* __restrict__ c, int64_t ldc) {
  using V = typename Vec<T>::type;
  V acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = *reinterpret_cast<const V*>(c + r * ldc);
  for (int64_t k = 0; k < K; ++k) {
    const V bv = *reinterpret_cast<const V*>(b + k * ldb);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += a[r * lda + k] * bv;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) *reinterpret_cast<V*>(c + r * ldc) = acc[r];
}

template <typename T>
TNT_INLINE void micro_rows(int64_t rows, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                           int64_t ldc) {
  switch (rows) {
    case 1: micro<T, 1>(K, a, lda, b, ldb, c, ldc); break;
    case 2: micro<T, 2>(K, a, lda, b, ldb, c, ldc); break;
    case 3: micro<T, 3>(K, a, lda, b, ldb, c, ldc); break;
    case 4: micro<T, 4>(K, a, lda, b, ldb, c, ldc); break;
    case 5: micro<T, 5>(K, a, lda, b, ldb, c, ldc); break;
    default: micro<T, 6>(K, a, lda, b, ldb, c, ldc); break;
  }
}

// c (rows × cols) += a (rows × K) · b (K × cols), strides as in `micro`.
template <typename T>
TNT_INLINE void gemm_acc(int64_t rows, int64_t cols, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                         T* c, int64_t ldc) {
  constexpr int C = Vec<T>::C;
  int64_t j0 = 0;
  for (; j0 + C <= cols; j0 += C) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMicroRows)
      micro_rows<T>(std::min<int64_t>(kMicroRows, rows - r0), K, a + r0 * lda, lda, b + j0, ldb, c + r0 * ldc + j0,
                    ldc);
  }
  if (j0 < cols) {
    const int64_t nc = cols - j0;
    for (int64_t r = 0; r < rows; ++r) {
      T* cr = c + r * ldc + j0;
      for (int64_t k = 0; k < K; ++k) {
        const T av = a[r * lda + k];
        const T* bk = b + k * ldb + j0;
        for (int64_t j = 0; j < nc; ++j) cr[j] += av * bk[j];
      }
    }
  }
}

// One row, heads g0 .. g0 + G, coordinates k0 .. k0 + C (one vector):
//   o[g·d + k] = bias[g][k] + Σ_h xr[h·d + k] W[h][g][k]   (bias may be null).
template <typename T, int G>
TNT_INLINE void mix_micro(int64_t H, int64_t d, const T* __restrict__ xr, const T* __restrict__ W,
                          const T* __restrict__ bias, T* __restrict__ o, int64_t g0, int64_t k0) {
  using V = typename Vec<T>::type;
  V acc[G];
#pragma GCC unroll 4
  for (int q = 0; q < G; ++q) acc[q] = bias ? vload(bias + (g0 + q) * d + k0) : V{} ;
  for (int64_t h = 0; h < H; ++h) {
    const V xv = vload(xr + h * d + k0);
    const T* w = W + (h * H + g0) * d + k0;
#pragma GCC unroll 4
    for (int q = 0; q < G; ++q) acc[q] += xv * vload(w + q * d);
  }
#pragma GCC unroll 4
  for (int q = 0; q < G; ++q) vstore(o + (g0 + q) * d + k0, acc[q]);
}

// out[r][g·d + k] = bias[g][k] + Σ_h in[r][h·d + k] W[h][g][k] for r < rows (bias may be null), all heads.
template <typename T>
TNT_INLINE void mix_rows(int64_t rows, int64_t H, int64_t d, const T* __restrict__ in, int64_t ld_in,
                         const T* __restrict__ W, const T* __restrict__ bias, T* __restrict__ out, int64_t ld_out) {
  constexpr int C = Vec<T>::C;
  const int64_t kv = d - d % C;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = in + r * ld_in;
    T* orow = out + r * ld_out;
    for (int64_t k0 = 0; k0 < kv; k0 += C) {
      int64_t g0 = 0;
      for (; g0 + 4 <= H; g0 += 4) mix_micro<T, 4>(H, d, xr, W, bias, orow, g0, k0);
      for (; g0 < H; ++g0) mix_micro<T, 1>(H, d, xr, W, bias, orow, g0, k0);
    }
    if (kv < d) {
      for (int64_t g = 0; g < H; ++g) {
        T* o = orow + g * d;
        for (int64_t k = kv; k < d; ++k) o[k] = bias ? bias[g * d + k] : T(0);
        for (int64_t h = 0; h < H; ++h) {
          const T* xh = xr + h * d;
          const T* w = W + (h * H + g) * d;
          for (int64_t k = kv; k < d; ++k) o[k] += xh[k] * w[k];
        }
      }
    }
  }
}

// acc[g][k] = Σ_{n < rows} xh[n][k] dz[n][g·d + k]  (xh rows at stride ld_x, dz rows at stride ld_dz), n increasing.
template <typename T>
TNT_INLINE void mix_wgrad(int64_t rows, int64_t H, int64_t d, const T* __restrict__ xh, int64_t ld_x,
                          const T* __restrict__ dz, int64_t ld_dz, T* __restrict__ acc) {
  using V = typename Vec<T>::type;
  constexpr int C = Vec<T>::C;
  const int64_t kv = d - d % C;
  for (int64_t k0 = 0; k0 < kv; k0 += C) {
    for (int64_t g0 = 0; g0 < H; g0 += 4) {
      const int64_t G = std::min<int64_t>(4, H - g0);
      V s[4] = {V{}, V{}, V{}, V{}};
      if (G == 4) {
        for (int64_t n = 0; n < rows; ++n) {
          const V xv = vload(xh + n * ld_x + k0);
          const T* dr = dz + n * ld_dz + g0 * d + k0;
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) s[q] += xv * vload(dr + q * d);
        }
      } else {
        for (int64_t n = 0; n < rows; ++n) {
          const V xv = vload(xh + n * ld_x + k0);
          const T* dr = dz + n * ld_dz + g0 * d + k0;
          for (int64_t q = 0; q < G; ++q) s[q] += xv * vload(dr + q * d);
        }
      }
      for (int64_t q = 0; q < G; ++q) vstore(acc + (g0 + q) * d + k0, s[q]);
    }
  }
  if (kv < d) {
    for (int64_t g = 0; g < H; ++g)
      for (int64_t k = kv; k < d; ++k) acc[g * d + k] = 0;
    for (int64_t n = 0; n < rows; ++n) {
      const T* xr = xh + n * ld_x;
      const T* dr = dz + n * ld_dz;
      for (int64_t g = 0; g < H; ++g)
        for (int64_t k = kv; k < d; ++k) acc[g * d + k] += xr[k] * dr[g * d + k];
    }
  }
}

// Entry points of the float path (one clone per ISA level); the double path uses the templates directly.
TNT_TARGET_CLONES void gemm_f32(int64_t rows, int64_t cols, int64_t K, const float* a, int64_t lda, const float* b,
                                int64_t ldb, float* c, int64_t ldc) {
  gemm_acc<float>(rows, cols, K, a, lda, b, ldb, c, ldc);
}
TNT_TARGET_CLONES void mix_rows_f32(int64_t rows, int64_t H, int64_t d, const float* in, int64_t ld_in, const float* W,
                                    const float* bias, float* out, int64_t ld_out) {
  mix_rows<float>(rows, H, d, in, ld_in, W, bias, out, ld_out);
}
TNT_TARGET_CLONES void mix_wgrad_f32(int64_t rows, int64_t H, int64_t d, const float* xh, int64_t ld_x, const float* dz,
                                     int64_t ld_dz, float* acc) {
  mix_wgrad<float>(rows, H, d, xh, ld_x, dz, ld_dz, acc);
}
void gemm_any(int64_t rows, int64_t cols, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
              float* c, int64_t ldc) {
  gemm_f32(rows, cols, K, a, lda, b, ldb, c, ldc);
}
void gemm_any(int64_t rows, int64_t cols, int64_t K, const double* a, int64_t lda, const double* b, int64_t ldb,
              double* c, int64_t ldc) {
  gemm_acc<double>(rows, cols, K, a, lda, b, ldb, c, ldc);
}
void mix_rows_any(int64_t rows, int64_t H, int64_t d, const float* in, int64_t ld_in, const float* W, const float* bias,
                  float* out, int64_t ld_out) {
  mix_rows_f32(rows, H, d, in, ld_in, W, bias, out, ld_out);
}
void mix_rows_any(int64_t rows, int64_t H, int64_t d, const double* in, int64_t ld_in, const double* W,
                  const double* bias, double* out, int64_t ld_out) {
  mix_rows<double>(rows, H, d, in, ld_in, W, bias, out, ld_out);
}
void mix_wgrad_any(int64_t rows, int64_t H, int64_t d, const float* xh, int64_t ld_x, const float* dz, int64_t ld_dz,
                   float* acc) {
  mix_wgrad_f32(rows, H, d, xh, ld_x, dz, ld_dz, acc);
}
void mix_wgrad_any(int64_t rows, int64_t H, int64_t d, const double* xh, int64_t ld_x, const double* dz, int64_t ld_dz,
                   double* acc) {
  mix_wgrad<double>(rows, H, d, xh, ld_x, dz, ld_dz, acc);
}


// The weights in the accumulation type, laid out for the kernels (empty vectors for absent parts).
template <typename T>
struct Packed {
  std::vector<T> mt;   // (H, H, d): mt[h][g][k] = M[k, h, g]   (forward mix)
  std::vector<T> mtt;  // (H, H, d): mtt[g][h][k] = M[k, h, g]  (dx = mix transpose)
  std::vector<T> mb;   // (H, d):    mb[g][k] = m[k, g]
  std::vector<T> A;    // (H, d, d)
  std::vector<T> At;   // (H, d, d): At[g][j][k] = A[g][k][j]
  std::vector<T> ab;   // (H, d)
};

template <typename T>
Packed<T> pack(const c10::optional<at::Tensor>& M, const c10::optional<at::Tensor>& m,
               const c10::optional<at::Tensor>& A, const c10::optional<at::Tensor>& a, int64_t H, int64_t d,
               bool need_mt, bool need_mtt, bool need_a, bool need_at) {
  Packed<T> p;
  if (M.has_value()) {
    const std::vector<T> w = to_vec<T>(*M);  // w[(k·H + h)·H + g]
    if (need_mt) p.mt.resize(H * H * d);
    if (need_mtt) p.mtt.resize(H * H * d);
    for (int64_t k = 0; k < d; ++k)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t g = 0; g < H; ++g) {
          const T v = w[(k * H + h) * H + g];
          if (need_mt) p.mt[(h * H + g) * d + k] = v;
          if (need_mtt) p.mtt[(g * H + h) * d + k] = v;
        }
  }
  if (m.has_value()) {
    const std::vector<T> b = to_vec<T>(*m);  // b[k·H + g]
    p.mb.resize(H * d);
    for (int64_t k = 0; k < d; ++k)
      for (int64_t g = 0; g < H; ++g) p.mb[g * d + k] = b[k * H + g];
  }
  if (A.has_value()) {
    std::vector<T> w = to_vec<T>(*A);
    if (need_at) {
      p.At.resize(H * d * d);
      for (int64_t g = 0; g < H; ++g)
        for (int64_t k = 0; k < d; ++k)
          for (int64_t j = 0; j < d; ++j) p.At[(g * d + j) * d + k] = w[(g * d + k) * d + j];
    }
    if (need_a) p.A = std::move(w);
  }
  if (a.has_value()) p.ab = to_vec<T>(*a);
  return p;
}

template <typename scalar_t>
void hsim_fwd_kernel(const scalar_t* x, scalar_t* y, const Packed<at::opmath_type<scalar_t>>& p, bool mix, bool block,
                     int64_t N, int64_t H, int64_t d) {
  using T = at::opmath_type<scalar_t>;
  const int64_t D = H * d, tiles = (N + kRows - 1) / kRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xa(kRows * D), z(mix ? kRows * D : 0), yb(kRows * d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kRows, R = std::min(kRows, N - n0);
      load(x + n0 * D, xa.data(), R * D);
      const T* zs = xa.data();
      if (mix) {
        mix_rows_any(R, H, d, xa.data(), D, p.mt.data(), p.mb.empty() ? nullptr : p.mb.data(), z.data(), D);
        zs = z.data();
      }
      for (int64_t g = 0; g < H; ++g) {
        const T* src = zs + g * d;
        int64_t ld = D;
        if (block) {
          for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < d; ++j) yb[r * d + j] = p.ab.empty() ? T(0) : p.ab[g * d + j];
          gemm_any(R, d, d, src, D, p.A.data() + g * d * d, d, yb.data(), d);
          src = yb.data();
          ld = d;
        }
        for (int64_t r = 0; r < R; ++r) store(src + r * ld, y + (n0 + r) * D + g * d, d);
      }
    }
  });
}

template <typename scalar_t>
void hsim_bwd_kernel(const scalar_t* dy, const scalar_t* x, const Packed<at::opmath_type<scalar_t>>& p, bool mix,
                     bool block, bool has_mb, bool has_ab, int64_t N, int64_t H, int64_t d, scalar_t* dx, scalar_t* dM,
                     scalar_t* dm, scalar_t* dA, scalar_t* da) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool same = std::is_same<T, scalar_t>::value;
  const int64_t D = H * d, tiles = (N + kRows - 1) / kRows;
  // Full-size buffers in the accumulation type, kept for the weight-gradient passes:
  //   zg: z (N × D) when both parts are present (z = x otherwise); dzg: dz when the mix is present;
  //   dyg / xg: dy / x converted, for 16-bit inputs, when the block / the mix gradient needs them.
  std::vector<T> zg(mix && block ? N * D : 0), dzg(mix ? N * D : 0);
  std::vector<T> dyg(!same && block ? N * D : 0), xg(!same && (mix || block) ? N * D : 0);
  const T* dyT = same ? reinterpret_cast<const T*>(dy) : dyg.data();
  const T* xT = same ? reinterpret_cast<const T*>(x) : xg.data();

  // Pass 1, per row tile: dz, dx, z.
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xa(kRows * D), dya(kRows * D), dz(kRows * D), out(kRows * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kRows, R = std::min(kRows, N - n0);
      load(dy + n0 * D, dya.data(), R * D);
      if (!same && block) std::copy(dya.begin(), dya.begin() + R * D, dyg.begin() + n0 * D);
      if (mix || block) {
        load(x + n0 * D, xa.data(), R * D);
        if (!same) std::copy(xa.begin(), xa.begin() + R * D, xg.begin() + n0 * D);
      }
      const T* dzs = dya.data();
      if (block) {
        std::fill(dz.begin(), dz.begin() + R * D, T(0));
        for (int64_t g = 0; g < H; ++g)
          gemm_any(R, d, d, dya.data() + g * d, D, p.At.data() + g * d * d, d, dz.data() + g * d, D);
        dzs = dz.data();
        if (mix)
          mix_rows_any(R, H, d, xa.data(), D, p.mt.data(), has_mb ? p.mb.data() : nullptr, zg.data() + n0 * D, D);
      }
      const T* dxs = dzs;
      if (mix) {
        std::copy(dzs, dzs + R * D, dzg.begin() + n0 * D);
        mix_rows_any(R, H, d, dzs, D, p.mtt.data(), nullptr, out.data(), D);
        dxs = out.data();
      }
      store(dxs, dx + n0 * D, R * D);
    }
  });

  // Pass 2: dA (tasks: head g × block of kWgradRows rows of A[g]) and da (one extra task).
  if (block) {
    const T* zsrc = mix ? zg.data() : xT;
    const int64_t kb = (d + kWgradRows - 1) / kWgradRows, tasks = H * kb + (has_ab ? 1 : 0);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> zt(kWgradRows * kNBlock), acc(std::max(kWgradRows * d, D));
      for (int64_t t = begin; t < end; ++t) {
        if (t == H * kb) {  // da = Σ_n dy
          std::fill(acc.begin(), acc.begin() + D, T(0));
          for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < D; ++c) acc[c] += dyT[n * D + c];
          store(acc.data(), da, D);
          continue;
        }
        const int64_t g = t / kb, k0 = (t % kb) * kWgradRows, K = std::min(kWgradRows, d - k0);
        std::fill(acc.begin(), acc.begin() + K * d, T(0));
        for (int64_t n0 = 0; n0 < N; n0 += kNBlock) {
          const int64_t nb = std::min(kNBlock, N - n0);
          for (int64_t n = 0; n < nb; ++n)  // zt[k][n] = z[n0 + n, g, k0 + k]
            for (int64_t k = 0; k < K; ++k) zt[k * nb + n] = zsrc[(n0 + n) * D + g * d + k0 + k];
          gemm_any(K, d, nb, zt.data(), nb, dyT + n0 * D + g * d, D, acc.data(), d);
        }
        store(acc.data(), dA + (g * d + k0) * d, K * d);
      }
    });
  }

  // Pass 3: dM (one task per head h) and dm (one extra task).
  if (mix) {
    const int64_t tasks = H + (has_mb ? 1 : 0);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(D);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), T(0));
        if (t == H) {  // dm[k, g] = Σ_n dz[n, g, k]
          for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < D; ++c) acc[c] += dzg[n * D + c];
          for (int64_t k = 0; k < d; ++k)
            for (int64_t g = 0; g < H; ++g) dm[k * H + g] = static_cast<scalar_t>(acc[g * d + k]);
          continue;
        }
        const int64_t h = t;  // acc[g][k] = Σ_n x[n, h, k] dz[n, g, k]
        mix_wgrad_any(N, H, d, xT + h * d, D, dzg.data(), D, acc.data());
        for (int64_t k = 0; k < d; ++k)
          for (int64_t g = 0; g < H; ++g) dM[(k * H + h) * H + g] = static_cast<scalar_t>(acc[g * d + k]);
      }
    });
  }
}

at::Tensor hsim_split_linear_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& M,
                                 const c10::optional<at::Tensor>& m, const c10::optional<at::Tensor>& A,
                                 const c10::optional<at::Tensor>& a) {
  const std::pair<int64_t, int64_t> hd = check_hsim_split_inputs(x_in, M, m, A, a);
  const int64_t H = hd.first, d = hd.second;
  TNT_CHECK_DEVICE(x_in, at::Device(at::kCPU));
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  const bool mix = M.has_value(), block = A.has_value();
  TNT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "hsim_split_linear_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Packed<T> p = pack<T>(M, m, A, a, H, d, mix, false, block, false);
    hsim_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p, mix, block, N, H, d);
  });
  return y;
}

std::vector<at::Tensor> hsim_split_linear_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                       const c10::optional<at::Tensor>& M,
                                                       const c10::optional<at::Tensor>& m,
                                                       const c10::optional<at::Tensor>& A,
                                                       const c10::optional<at::Tensor>& a) {
  const std::pair<int64_t, int64_t> hd = check_hsim_split_inputs(x_in, M, m, A, a);
  const int64_t H = hd.first, d = hd.second;
  check_hsim_split_backward_inputs(grad_y_in, x_in);
  TNT_CHECK_DEVICE(x_in, at::Device(at::kCPU));
  const at::Tensor x = x_in.contiguous(), g = grad_y_in.contiguous();
  const int64_t N = x.size(0);
  const bool mix = M.has_value(), block = A.has_value();
  std::vector<at::Tensor> grads = hsim_split_grad_outputs(x, H, d, mix, m.has_value(), block, a.has_value());
  if (N == 0 || H * d == 0) return grads;  // weight gradients zero-filled (empty sums)
  at::Tensor &dx = grads[0], &dM = grads[1], &dm = grads[2], &dA = grads[3], &da = grads[4];
  TNT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "hsim_split_linear_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Packed<T> p = pack<T>(M, m, A, a, H, d, mix && block, mix, false, block);
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    hsim_bwd_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), p, mix, block, m.has_value(),
                              a.has_value(), N, H, d, dx.data_ptr<scalar_t>(), ptr(dM), ptr(dm), ptr(dA), ptr(da));
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CPU, m) {
  m.impl("hsim_split_linear", &hsim_split_linear_cpu);
  m.impl("hsim_split_linear_backward", &hsim_split_linear_backward_cpu);
}

}  // namespace tntkernels

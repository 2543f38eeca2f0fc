// Nested-logit multi-head attention on CPU (CODA / RealFormer; tntkernels/ops/nested_attention.py).
//
// q, k (B, H, T, d); v (B, H, T, dv); prev_logits, noise (B, H, T, T); head_mlp: none or six tensors
// (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)), nn.Linear convention.
//
//   forward:  S = (q kᵀ)·scale (+ prev);  Z = S + MLP(U) (CODA, prev given; U = S with −inf → 0) or Z = S;
//             Z += noise;  P = softmax_rows(Z);  out = P v;  lse = log Σ_j exp(Z_ij)
//   backward: Z recomputed as the forward computed it (accumulation type, noise included: the returned
//             logits may be rounded to fp16 / bf16);  P = exp(Z − lse);  dV = Pᵀ gO;  dP = gO vᵀ;
//             dZ = gZ + P ⊙ (dP − rowsum(dP ⊙ P));
//             CODA: back through the MLP, dS = dZ + dU (dU = 0 where S = −inf); else dS = dZ;
//             dprev = dS;  dq = scale dS k;  dk = scale dSᵀ q.
//
// Two paths, both over fixed chunks of sequences b (the chunk size depends on B only, never on the thread
// count; at::parallel_for over the chunks; a task handles all heads of its sequences, as the head-MLP mixes
// them):
//   T = 16, float32, d, dv <= 64 (TNT's inner shape): every 16 × 16 tile lives in 16-lane vectors (one per
//     row, cpu_math.h), GEMMs are broadcast-FMAs in registers, the softmax runs on the tile transposed in
//     registers (the machinery of inner attention) — no ATen call per sequence;
//   any other shape or dtype: per sequence, the GEMMs (q kᵀ, P v, gO vᵀ, Pᵀ gO, dS k, dSᵀ q) run on per-task
//     buffers in the accumulation type with this file's register-tiled GEMM (no library call inside a
//     task), and everything between them (scale, + prev, the head-MLP, + noise, the logits, softmax, lse,
//     dZ, the MLP backward, dprev) is one pass over each row i of all heads, while that row is in L1.
// The head-MLP runs on blocks of C positions (C = the lanes of Vec<acc_t>: 16 floats / 8 doubles), one
// position per lane, its weights broadcast: a block's activations stay in registers / L1. Its weight
// gradients go to per-lane accumulators of the task (one vector per weight; the any-shape path first sums a
// row's blocks in registers, outer_acc, so that they are read and written once per row), summed over the lanes in lane
// order into one partial row per chunk, and the rows are summed in chunk order at the end: results do not
// depend on the number of threads. Accumulation in float for float16 / bfloat16 / float32, double for
// float64. One at::parallel_for per call, nothing parallel inside it.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tntkernels/cpu_math.h"
#include "tntkernels/cpu_vec.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/nested_attention.h"

namespace tntkernels {

namespace {

constexpr double kSlope = 0.2;  // LeakyReLU negative slope of the head-MLP

template <typename acc_t>
using VecT = typename Vec<acc_t>::type;

// The head-MLP's weights in the accumulation type, flattened w1 b1 w2 b2 w3 b3 (the layout of the weight
// gradients' partial rows too).
template <typename acc_t>
struct MlpW {
  const acc_t *w1, *b1, *w2, *b2, *w3, *b3;
  int64_t H, F;
  MlpW(const acc_t* W, int64_t H_) : H(H_), F(4 * H_) {
    w1 = W;
    b1 = w1 + F * H;
    w2 = b1 + F;
    b2 = w2 + F * F;
    w3 = b2 + F;
    b3 = w3 + H * F;
  }
};

template <typename acc_t>
TNT_INLINE VecT<acc_t> leaky(VecT<acc_t> x) {
  return x > acc_t(0) ? x : x * acc_t(kSlope);
}

// One block of positions (one per lane): a1 = leaky(W1 u + b1), a2 = leaky(W2 a1 + b2), y = W3 a2 + b3.
// u, y: H vectors; a1, a2: F vectors. HC > 0: H fixed at compile time (the loops unroll, a block stays in
// registers); 0: m.H.
template <typename acc_t, int64_t HC>
TNT_INLINE void mlp_fwd(const MlpW<acc_t>& m, const VecT<acc_t>* __restrict__ u, VecT<acc_t>* __restrict__ a1,
                        VecT<acc_t>* __restrict__ a2, VecT<acc_t>* __restrict__ y) {
  using V = VecT<acc_t>;
  const int64_t H = HC > 0 ? HC : m.H, F = 4 * H;
  for (int64_t r = 0; r < F; ++r) {
    V acc = V{} + m.b1[r];
    for (int64_t c = 0; c < H; ++c) acc += m.w1[r * H + c] * u[c];
    a1[r] = leaky<acc_t>(acc);
  }
  for (int64_t r = 0; r < F; ++r) {
    V acc = V{} + m.b2[r];
    for (int64_t c = 0; c < F; ++c) acc += m.w2[r * F + c] * a1[c];
    a2[r] = leaky<acc_t>(acc);
  }
  for (int64_t r = 0; r < H; ++r) {
    V acc = V{} + m.b3[r];
    for (int64_t c = 0; c < F; ++c) acc += m.w3[r * F + c] * a2[c];
    y[r] = acc;
  }
}

// Back through mlp_fwd for one block (the T = 16 path; the any-shape path splits it into mlp_bwd_data and
// outer_acc over a row's blocks): dy (H) → du (H); d1, d2: F vectors of scratch. G: per-lane weight
// gradient accumulators in the flattened weight layout (lanes with dy = 0 add exact zeros).
template <typename acc_t, int64_t HC>
TNT_INLINE void mlp_bwd(const MlpW<acc_t>& m, const VecT<acc_t>* __restrict__ u, const VecT<acc_t>* __restrict__ a1,
                        const VecT<acc_t>* __restrict__ a2, const VecT<acc_t>* __restrict__ dy,
                        VecT<acc_t>* __restrict__ d1, VecT<acc_t>* __restrict__ d2, VecT<acc_t>* __restrict__ du,
                        VecT<acc_t>* __restrict__ G) {
  using V = VecT<acc_t>;
  const int64_t H = HC > 0 ? HC : m.H, F = 4 * H;
  V *gw1 = G, *gb1 = gw1 + F * H, *gw2 = gb1 + F, *gb2 = gw2 + F * F, *gw3 = gb2 + F, *gb3 = gw3 + H * F;
  for (int64_t h = 0; h < H; ++h) {  // dW3 += dy a2ᵀ, db3 += dy
    gb3[h] += dy[h];
    for (int64_t c = 0; c < F; ++c) gw3[h * F + c] += dy[h] * a2[c];
  }
  for (int64_t r = 0; r < F; ++r) {  // d2 = (W3ᵀ dy) ⊙ leaky'(a2)
    V acc = V{};
    for (int64_t h = 0; h < H; ++h) acc += m.w3[h * F + r] * dy[h];
    d2[r] = a2[r] > acc_t(0) ? acc : acc * acc_t(kSlope);
  }
  for (int64_t r = 0; r < F; ++r) {  // dW2 += d2 a1ᵀ, db2 += d2
    gb2[r] += d2[r];
    for (int64_t c = 0; c < F; ++c) gw2[r * F + c] += d2[r] * a1[c];
  }
  for (int64_t c = 0; c < F; ++c) {  // d1 = (W2ᵀ d2) ⊙ leaky'(a1)
    V acc = V{};
    for (int64_t r = 0; r < F; ++r) acc += m.w2[r * F + c] * d2[r];
    d1[c] = a1[c] > acc_t(0) ? acc : acc * acc_t(kSlope);
  }
  for (int64_t r = 0; r < F; ++r) {  // dW1 += d1 uᵀ, db1 += d1
    gb1[r] += d1[r];
    for (int64_t c = 0; c < H; ++c) gw1[r * H + c] += d1[r] * u[c];
  }
  for (int64_t c = 0; c < H; ++c) {  // du = W1ᵀ d1
    V acc = V{};
    for (int64_t r = 0; r < F; ++r) acc += m.w1[r * H + c] * d1[r];
    du[c] = acc;
  }
}

// The data half of mlp_bwd (no weight gradients): dy (H) → d2, d1 (F, kept for mlp_wgrad) → du (H).
template <typename acc_t, int64_t HC>
TNT_INLINE void mlp_bwd_data(const MlpW<acc_t>& m, const VecT<acc_t>* __restrict__ a1,
                             const VecT<acc_t>* __restrict__ a2, const VecT<acc_t>* __restrict__ dy,
                             VecT<acc_t>* __restrict__ d1, VecT<acc_t>* __restrict__ d2, VecT<acc_t>* __restrict__ du) {
  using V = VecT<acc_t>;
  const int64_t H = HC > 0 ? HC : m.H, F = 4 * H;
  for (int64_t r = 0; r < F; ++r) {  // d2 = (W3ᵀ dy) ⊙ leaky'(a2)
    V acc = V{};
    for (int64_t h = 0; h < H; ++h) acc += m.w3[h * F + r] * dy[h];
    d2[r] = a2[r] > acc_t(0) ? acc : acc * acc_t(kSlope);
  }
  for (int64_t c = 0; c < F; ++c) {  // d1 = (W2ᵀ d2) ⊙ leaky'(a1)
    V acc = V{};
    for (int64_t r = 0; r < F; ++r) acc += m.w2[r * F + c] * d2[r];
    d1[c] = a1[c] > acc_t(0) ? acc : acc * acc_t(kSlope);
  }
  for (int64_t c = 0; c < H; ++c) {  // du = W1ᵀ d1
    V acc = V{};
    for (int64_t r = 0; r < F; ++r) acc += m.w1[r * H + c] * d1[r];
    du[c] = acc;
  }
}

// G[r·N + c] += Σ_b X_b[r] ⊙ Y_b[c] and gb[r] += Σ_b X_b[r] over nb blocks (X_b = X + b·sx, Y_b = Y + b·sy),
// lane by lane: the weight gradients of one row's blocks as one small GEMM over the blocks, in registers,
// so that each lane accumulator of G is read and written once per row instead of once per block. Every
// element is one sum over b in increasing order, whatever the tiling.
template <typename acc_t, int RT, int CT>
TNT_INLINE void outer_tile(int64_t nb, const VecT<acc_t>* X, int64_t sx, const VecT<acc_t>* Y, int64_t sy,
                           VecT<acc_t>* G, int64_t N, int64_t r0, int64_t c0) {
  using V = VecT<acc_t>;
  V acc[RT][CT];
  for (int rr = 0; rr < RT; ++rr)
    for (int cc = 0; cc < CT; ++cc) acc[rr][cc] = V{};
  for (int64_t b = 0; b < nb; ++b) {
    V x[RT];
    for (int rr = 0; rr < RT; ++rr) x[rr] = X[b * sx + r0 + rr];
    for (int cc = 0; cc < CT; ++cc) {
      const V y = Y[b * sy + c0 + cc];
      for (int rr = 0; rr < RT; ++rr) acc[rr][cc] += x[rr] * y;
    }
  }
  for (int rr = 0; rr < RT; ++rr)
    for (int cc = 0; cc < CT; ++cc) G[(r0 + rr) * N + c0 + cc] += acc[rr][cc];
}
template <typename acc_t>
TNT_INLINE void outer_acc(int64_t nb, int64_t R, int64_t N, const VecT<acc_t>* X, int64_t sx, const VecT<acc_t>* Y,
                          int64_t sy, VecT<acc_t>* G, VecT<acc_t>* gb) {
  using V = VecT<acc_t>;
  for (int64_t r = 0; r < R; ++r) {
    V a = V{};
    for (int64_t b = 0; b < nb; ++b) a += X[b * sx + r];
    gb[r] += a;
  }
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    int64_t c = 0;
    for (; c + 6 <= N; c += 6) outer_tile<acc_t, 4, 6>(nb, X, sx, Y, sy, G, N, r, c);
    for (; c < N; ++c) outer_tile<acc_t, 4, 1>(nb, X, sx, Y, sy, G, N, r, c);
  }
  for (; r < R; ++r) {
    int64_t c = 0;
    for (; c + 6 <= N; c += 6) outer_tile<acc_t, 1, 6>(nb, X, sx, Y, sy, G, N, r, c);
    for (; c < N; ++c) outer_tile<acc_t, 1, 1>(nb, X, sx, Y, sy, G, N, r, c);
  }
}

template <typename acc_t>
TNT_INLINE VecT<acc_t> mask_neginf(VecT<acc_t> s) {  // U = S with −inf → 0
  return s == -std::numeric_limits<acc_t>::infinity() ? VecT<acc_t>{} : s;
}

// n <= C elements at p as a vector, lanes from n on zero.
template <typename acc_t>
TNT_INLINE VecT<acc_t> loadn(const acc_t* p, int64_t n) {
  constexpr int64_t C = Vec<acc_t>::C;
  if (n == C) return vload(p);
  alignas(64) acc_t t[C] = {};
  for (int64_t l = 0; l < n; ++l) t[l] = p[l];
  return vload(t);
}
template <typename acc_t>
TNT_INLINE void storen(acc_t* p, VecT<acc_t> x, int64_t n) {
  constexpr int64_t C = Vec<acc_t>::C;
  if (n == C) return vstore(p, x);
  alignas(64) acc_t t[C];
  vstore(t, x);
  for (int64_t l = 0; l < n; ++l) p[l] = t[l];
}
template <typename acc_t>
TNT_INLINE acc_t hsum(VecT<acc_t> x) {  // the lanes summed in lane order
  acc_t s = 0;
  for (int64_t l = 0; l < Vec<acc_t>::C; ++l) s += x[l];
  return s;
}

// Row sums and maxima in C-lane partials (then the lanes in order): vectorized and, the blocking being
// fixed, the same order on every call.
template <typename acc_t>
TNT_INLINE acc_t row_max(const acc_t* x, int64_t n) {
  using V = VecT<acc_t>;
  constexpr int64_t C = Vec<acc_t>::C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  V m = V{} + ninf;
  int64_t j = 0;
  for (; j + C <= n; j += C) {
    const V s = vload(x + j);
    m = s > m ? s : m;
  }
  acc_t r = ninf;
  for (int64_t l = 0; l < C; ++l) r = m[l] > r ? m[l] : r;
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}
template <typename acc_t>
TNT_INLINE acc_t row_dot(const acc_t* a, const acc_t* b, int64_t n) {
  using V = VecT<acc_t>;
  constexpr int64_t C = Vec<acc_t>::C;
  V s = V{};
  int64_t j = 0;
  for (; j + C <= n; j += C) s += vload(a + j) * vload(b + j);
  acc_t r = hsum<acc_t>(s);
  for (; j < n; ++j) r += a[j] * b[j];
  return r;
}

// ---- any shape: GEMMs on per-task buffers ------------------------------------------------------------
// C (M × N) = alpha · A (M × K) · B (K × N): A read through strides (sai, sak), so a transposed operand
// needs no copy; B and C row-major with N and their row lengths multiples of C lanes (padded buffers;
// B's padding zero). A register tile of MR rows × NV vectors accumulates over k in increasing order, so
// every element is one fixed-order sum, whatever the thread count. No library call: a task runs none
// (ATen's GEMMs called inside at::parallel_for cost a thread synchronisation each on a loaded machine,
// measured at ~15 ms per call with 2 threads on a 2-core box, whatever their size).
template <typename acc_t, int MR, int NV>
TNT_INLINE void gemm_tile(int64_t K, const acc_t* __restrict__ A, int64_t sai, int64_t sak,
                          const acc_t* __restrict__ B, int64_t ldb, acc_t* __restrict__ Cm, int64_t ldc, acc_t alpha) {
  using V = VecT<acc_t>;
  constexpr int64_t C = Vec<acc_t>::C;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int n = 0; n < NV; ++n) b[n] = vload(B + k * ldb + n * C);
    for (int r = 0; r < MR; ++r) {
      const acc_t a = A[r * sai + k * sak];
      for (int n = 0; n < NV; ++n) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) vstore(Cm + r * ldc + n * C, acc[r][n] * alpha);
}
template <typename acc_t, int NV>
TNT_INLINE void gemm_panel(int64_t M, int64_t K, const acc_t* A, int64_t sai, int64_t sak, const acc_t* B,
                           int64_t ldb, acc_t* Cm, int64_t ldc, acc_t alpha) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm_tile<acc_t, MR, NV>(K, A + i * sai, sai, sak, B, ldb, Cm + i * ldc, ldc, alpha);
  for (; i < M; ++i) gemm_tile<acc_t, 1, NV>(K, A + i * sai, sai, sak, B, ldb, Cm + i * ldc, ldc, alpha);
}
template <typename acc_t>
TNT_INLINE void gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t sai, int64_t sak, const acc_t* B,
                     int64_t ldb, acc_t* Cm, int64_t ldc, acc_t alpha) {
  constexpr int64_t C = Vec<acc_t>::C;
  int64_t j = 0;
  for (; j + 2 * C <= N; j += 2 * C) gemm_panel<acc_t, 2>(M, K, A, sai, sak, B + j, ldb, Cm + j, ldc, alpha);
  for (; j < N; j += C) gemm_panel<acc_t, 1>(M, K, A, sai, sak, B + j, ldb, Cm + j, ldc, alpha);
}
TNT_TARGET_CLONES void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak,
                                const float* B, int64_t ldb, float* Cm, int64_t ldc, float alpha) {
  gemm<float>(M, N, K, A, sai, sak, B, ldb, Cm, ldc, alpha);
}
void gemm_any(int64_t M, int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
              float* Cm, int64_t ldc, float alpha) {
  gemm_f32(M, N, K, A, sai, sak, B, ldb, Cm, ldc, alpha);
}
void gemm_any(int64_t M, int64_t N, int64_t K, const double* A, int64_t sai, int64_t sak, const double* B,
              int64_t ldb, double* Cm, int64_t ldc, double alpha) {
  gemm<double>(M, N, K, A, sai, sak, B, ldb, Cm, ldc, alpha);
}

// ---- any shape: one row i of all heads of one sequence, between the GEMMs -----------------------------
// Pointers are at row i of head 0; heads are sh.SS (scratch) / sh.TT (tensors) / T (lse) apart. prev,
// noise, gz, logits, dprev may be null.

struct RowShape {
  int64_t H, T;
  int64_t TT;  // head stride of prev, noise, logits, grad_logits, dprev (T·T)
  int64_t SS;  // head stride of the scratch s, dp (T rows of ⌈T / C⌉·C)
};

// s (H rows, the raw q kᵀ) → P (normalized) in place; writes the logits Z and lse. blk: scratch of
// fwd_blk_vectors(H) vectors.
template <typename acc_t, int64_t HC>
TNT_INLINE void fwd_row(const MlpW<acc_t>* mlp, acc_t* s, const acc_t* prev, const acc_t* noise, acc_t* logits,
                        acc_t* lse, RowShape sh, acc_t scale, VecT<acc_t>* blk) {
  using V = VecT<acc_t>;
  constexpr int64_t C = Vec<acc_t>::C;
  const int64_t H = HC > 0 ? HC : sh.H, T = sh.T, TT = sh.TT, SS = sh.SS;
  for (int64_t h = 0; h < H; ++h) {
    acc_t* sh_ = s + h * SS;
    if (prev) {
      const acc_t* p = prev + h * TT;
      for (int64_t j = 0; j < T; ++j) sh_[j] = sh_[j] * scale + p[j];
    } else {
      for (int64_t j = 0; j < T; ++j) sh_[j] = sh_[j] * scale;
    }
  }
  if (mlp) {
    const int64_t F = 4 * H;
    V *sv = blk, *u = sv + H, *a1 = u + H, *a2 = a1 + F, *y = a2 + F;
    for (int64_t j0 = 0; j0 < T; j0 += C) {
      const int64_t n = std::min(C, T - j0);
      for (int64_t h = 0; h < H; ++h) sv[h] = loadn(s + h * SS + j0, n);
      for (int64_t h = 0; h < H; ++h) u[h] = mask_neginf<acc_t>(sv[h]);
      mlp_fwd<acc_t, HC>(*mlp, u, a1, a2, y);
      for (int64_t h = 0; h < H; ++h) storen(s + h * SS + j0, sv[h] + y[h], n);  // Z = S + MLP(U)
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    acc_t* z = s + h * SS;
    if (noise) {
      const acc_t* e = noise + h * TT;
      for (int64_t j = 0; j < T; ++j) z[j] += e[j];
    }
    if (logits) std::memcpy(logits + h * TT, z, T * sizeof(acc_t));
    const acc_t mx = row_max(z, T);
    const acc_t shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
    for (int64_t j = 0; j < T; ++j) z[j] = exp_acc(z[j] - shift);
    V sv = V{};
    int64_t j = 0;
    for (; j + C <= T; j += C) sv += vload(z + j);
    acc_t sum = hsum<acc_t>(sv);
    for (; j < T; ++j) sum += z[j];
    lse[h * T] = shift + log_acc(sum);
    const acc_t inv = acc_t(1) / sum;
    for (int64_t jj = 0; jj < T; ++jj) z[jj] *= inv;
  }
}

// s (the raw q kᵀ) → P; dp (the raw gO vᵀ) → dS; writes dprev (if not null). blk: scratch of
// nb·(H + 2F) + (3F + 2H) vectors, nb = ⌈T / C⌉; G: the task's weight-gradient lane accumulators.
template <typename acc_t, int64_t HC>
TNT_INLINE void bwd_row(const MlpW<acc_t>* mlp, acc_t* s, acc_t* dp, const acc_t* prev, const acc_t* noise,
                        const acc_t* gz, const acc_t* lse, acc_t* dprev, RowShape sh, acc_t scale,
                        VecT<acc_t>* blk, VecT<acc_t>* G) {
  using V = VecT<acc_t>;
  constexpr int64_t C = Vec<acc_t>::C;
  const int64_t H = HC > 0 ? HC : sh.H, T = sh.T, TT = sh.TT, SS = sh.SS, F = 4 * H;
  const int64_t nb = (T + C - 1) / C;
  for (int64_t h = 0; h < H; ++h) {
    acc_t* sh_ = s + h * SS;
    if (prev) {
      const acc_t* p = prev + h * TT;
      for (int64_t j = 0; j < T; ++j) sh_[j] = sh_[j] * scale + p[j];
    } else {
      for (int64_t j = 0; j < T; ++j) sh_[j] = sh_[j] * scale;
    }
  }
  V *sb = blk, *a1b = sb + nb * H, *a2b = a1b + nb * F, *u = a2b + nb * F, *y = u + H,
    *du = y + H, *dyb = du + H, *ub = dyb + nb * H, *d1b = ub + nb * H, *d2b = d1b + nb * F;
  if (mlp) {  // as fwd_row, keeping S, a1, a2 of every block of the row
    for (int64_t b = 0, j0 = 0; j0 < T; ++b, j0 += C) {
      const int64_t n = std::min(C, T - j0);
      V* sbb = sb + b * H;
      for (int64_t h = 0; h < H; ++h) sbb[h] = loadn(s + h * SS + j0, n);
      for (int64_t h = 0; h < H; ++h) u[h] = mask_neginf<acc_t>(sbb[h]);
      mlp_fwd<acc_t, HC>(*mlp, u, a1b + b * F, a2b + b * F, y);
      for (int64_t h = 0; h < H; ++h) storen(s + h * SS + j0, sbb[h] + y[h], n);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    acc_t* z = s + h * SS;
    acc_t* g = dp + h * SS;
    if (noise) {
      const acc_t* e = noise + h * TT;
      for (int64_t j = 0; j < T; ++j) z[j] += e[j];
    }
    const acc_t l = lse[h * T];
    for (int64_t j = 0; j < T; ++j) z[j] = exp_acc(z[j] - l);  // P
    const acc_t delta = row_dot(z, g, T);
    if (gz) {
      const acc_t* gzh = gz + h * TT;
      for (int64_t j = 0; j < T; ++j) g[j] = gzh[j] + z[j] * (g[j] - delta);
    } else {
      for (int64_t j = 0; j < T; ++j) g[j] = z[j] * (g[j] - delta);
    }
  }
  if (mlp) {  // dS = dZ + dU where S > −inf; block by block, keeping dZ, U, d1, d2 of the row's blocks
    for (int64_t b = 0, j0 = 0; j0 < T; ++b, j0 += C) {
      const int64_t n = std::min(C, T - j0);
      const V* sbb = sb + b * H;
      V* dy = dyb + b * H;
      for (int64_t h = 0; h < H; ++h) dy[h] = loadn(dp + h * SS + j0, n);  // dZ, zero beyond the row
      for (int64_t h = 0; h < H; ++h) ub[b * H + h] = mask_neginf<acc_t>(sbb[h]);
      mlp_bwd_data<acc_t, HC>(*mlp, a1b + b * F, a2b + b * F, dy, d1b + b * F, d2b + b * F, du);
      const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
      for (int64_t h = 0; h < H; ++h) storen(dp + h * SS + j0, dy[h] + (sbb[h] == ninf ? V{} : du[h]), n);
    }
    // Weight gradients (lanes with dZ = 0 add exact zeros), in mlp_bwd's layout: w1 b1 w2 b2 w3 b3.
    V *gw1 = G, *gb1 = gw1 + F * H, *gw2 = gb1 + F, *gb2 = gw2 + F * F, *gw3 = gb2 + F, *gb3 = gw3 + H * F;
    outer_acc<acc_t>(nb, H, F, dyb, H, a2b, F, gw3, gb3);  // dW3 += dy a2ᵀ
    outer_acc<acc_t>(nb, F, F, d2b, F, a1b, F, gw2, gb2);  // dW2 += d2 a1ᵀ
    outer_acc<acc_t>(nb, F, H, d1b, F, ub, H, gw1, gb1);   // dW1 += d1 uᵀ
  }
  if (dprev)
    for (int64_t h = 0; h < H; ++h) std::memcpy(dprev + h * TT, dp + h * SS, T * sizeof(acc_t));
}

int64_t fwd_blk_vectors(int64_t H) { return 3 * H + 8 * H; }
int64_t bwd_blk_vectors(int64_t H, int64_t T, int64_t C) {
  const int64_t F = 4 * H, nb = (T + C - 1) / C;
  return nb * (3 * H + 4 * F) + 3 * F + 3 * H;
}

// The float rows, compiled per ISA level; H 4 and 6 (TNT-S inner and outer) unrolled.
TNT_TARGET_CLONES void fwd_row_f32(const MlpW<float>* mlp, float* s, const float* prev, const float* noise,
                                   float* logits, float* lse, RowShape sh, float scale, VecT<float>* blk) {
  if (sh.H == 4) fwd_row<float, 4>(mlp, s, prev, noise, logits, lse, sh, scale, blk);
  else if (sh.H == 6) fwd_row<float, 6>(mlp, s, prev, noise, logits, lse, sh, scale, blk);
  else fwd_row<float, 0>(mlp, s, prev, noise, logits, lse, sh, scale, blk);
}
TNT_TARGET_CLONES void bwd_row_f32(const MlpW<float>* mlp, float* s, float* dp, const float* prev, const float* noise,
                                   const float* gz, const float* lse, float* dprev, RowShape sh, float scale,
                                   VecT<float>* blk, VecT<float>* G) {
  if (sh.H == 4) bwd_row<float, 4>(mlp, s, dp, prev, noise, gz, lse, dprev, sh, scale, blk, G);
  else if (sh.H == 6) bwd_row<float, 6>(mlp, s, dp, prev, noise, gz, lse, dprev, sh, scale, blk, G);
  else bwd_row<float, 0>(mlp, s, dp, prev, noise, gz, lse, dprev, sh, scale, blk, G);
}
void fwd_row_any(const MlpW<float>* mlp, float* s, const float* prev, const float* noise, float* logits, float* lse,
                 RowShape sh, float scale, VecT<float>* blk) {
  fwd_row_f32(mlp, s, prev, noise, logits, lse, sh, scale, blk);
}
void fwd_row_any(const MlpW<double>* mlp, double* s, const double* prev, const double* noise, double* logits,
                 double* lse, RowShape sh, double scale, VecT<double>* blk) {
  fwd_row<double, 0>(mlp, s, prev, noise, logits, lse, sh, scale, blk);
}
void bwd_row_any(const MlpW<float>* mlp, float* s, float* dp, const float* prev, const float* noise, const float* gz,
                 const float* lse, float* dprev, RowShape sh, float scale, VecT<float>* blk, VecT<float>* G) {
  bwd_row_f32(mlp, s, dp, prev, noise, gz, lse, dprev, sh, scale, blk, G);
}
void bwd_row_any(const MlpW<double>* mlp, double* s, double* dp, const double* prev, const double* noise,
                 const double* gz, const double* lse, double* dprev, RowShape sh, double scale, VecT<double>* blk,
                 VecT<double>* G) {
  bwd_row<double, 0>(mlp, s, dp, prev, noise, gz, lse, dprev, sh, scale, blk, G);
}

// ---- T = 16, float32: one sequence (all heads) on 16-lane tiles ------------------------------------
constexpr int64_t kFastMaxDim = 64;

// z[i] = (q[i] · kᵀ)·scale + prev[i] for one head (rows over the queries, lanes over the keys): the
// forward and the backward both call it, so the backward's Z is the forward's bit for bit.
template <int64_t D>
TNT_INLINE void scores16(const float* q, const float* k, const float* prev, V16* z, int64_t d_rt, float scale) {
  const int64_t d = D > 0 ? D : d_rt;
  alignas(64) float kt[kFastMaxDim][kM];
  load_t16(k, kt, d, 1.0f);
  for (int64_t i = 0; i < kM; ++i) {
    V16 acc = V16{};
    for (int64_t c = 0; c < d; ++c) acc += q[i * d + c] * vload(kt[c]);
    acc *= scale;
    z[i] = prev ? acc + vload(prev + i * kM) : acc;
  }
}

// Z (H × 16 rows) of one sequence: scores, + MLP (s: the pre-MLP S rows, a1/a2 per row when kept), + noise.
template <int64_t HC, int64_t D>
TNT_INLINE void logits16(const MlpW<float>* mlp, const float* q, const float* k, const float* prev,
                         const float* noise, V16* z, V16* s, V16* a1, V16* a2, V16* tmp, int64_t H_rt, int64_t d,
                         float scale) {
  const int64_t H = HC > 0 ? HC : H_rt, F = 4 * H, TT = kM * kM;
  for (int64_t h = 0; h < H; ++h)
    scores16<D>(q + h * kM * d, k + h * kM * d, prev ? prev + h * TT : nullptr, z + h * kM, d, scale);
  if (mlp) {
    V16 *u = tmp, *y = u + H, *b1 = y + H, *b2 = b1 + F;
    for (int64_t i = 0; i < kM; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        if (s) s[i * H + h] = z[h * kM + i];
        u[h] = mask_neginf<float>(z[h * kM + i]);
      }
      mlp_fwd<float, HC>(*mlp, u, a1 ? a1 + i * F : b1, a2 ? a2 + i * F : b2, y);
      for (int64_t h = 0; h < H; ++h) z[h * kM + i] += y[h];
    }
  }
  if (noise)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < kM; ++i) z[h * kM + i] += vload(noise + h * TT + i * kM);
}

template <int64_t HC, int64_t D>
TNT_INLINE void fwd16_body(const MlpW<float>* mlp, const float* q, const float* k, const float* v, const float* prev,
                           const float* noise, float* out, float* logits, float* lse, V16* work, int64_t H_rt,
                           int64_t d_rt, int64_t dv, float scale) {
  const int64_t H = HC > 0 ? HC : H_rt, d = D > 0 ? D : d_rt, TT = kM * kM;
  V16* z = work;               // H × 16
  V16* tmp = z + H * kM;       // 2H + 8H
  logits16<HC, D>(mlp, q, k, prev, noise, z, nullptr, nullptr, nullptr, tmp, H, d, scale);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t h = 0; h < H; ++h) {
    V16* zt = z + h * kM;
    for (int64_t i = 0; i < kM; ++i) vstore(logits + h * TT + i * kM, zt[i]);
    transpose16(zt);  // keys × queries
    alignas(64) float p[kM][kM], ot[kFastMaxDim][kM], mx[kM], sum[kM];
    V16 m = zt[0];
    for (int64_t j = 1; j < kM; ++j) m = zt[j] > m ? zt[j] : m;
    m = m == -inf ? V16{} : m;
    vstore(mx, m);
    for (int64_t j = 0; j < kM; ++j) vstore(p[j], zt[j]);
    for (int64_t j = 0; j < kM; ++j)
      for (int64_t i = 0; i < kM; ++i) p[j][i] = exp_f32(p[j][i] - mx[i]);
    V16 sv = V16{};
    for (int64_t j = 0; j < kM; ++j) sv += vload(p[j]);
    vstore(sum, sv);
    for (int64_t i = 0; i < kM; ++i) lse[h * kM + i] = mx[i] + log_f32(sum[i]);
    const V16 inv = 1.0f / sv;
    const float* vh = v + h * kM * dv;
    for (int64_t c = 0; c < dv; ++c) {
      V16 acc = V16{};
      for (int64_t j = 0; j < kM; ++j) acc += vh[j * dv + c] * vload(p[j]);
      vstore(ot[c], acc * inv);
    }
    store_t16(ot, out + h * kM * dv, dv);
  }
}

template <int64_t HC, int64_t D>
TNT_INLINE void bwd16_body(const MlpW<float>* mlp, const float* g, const float* gz, const float* q, const float* k,
                           const float* v, const float* prev, const float* noise, const float* lse, float* dq,
                           float* dk, float* dvo, float* dprev, V16* work, V16* G, int64_t H_rt, int64_t d_rt,
                           int64_t dv, float scale) {
  const int64_t H = HC > 0 ? HC : H_rt, d = D > 0 ? D : d_rt, F = 4 * H, TT = kM * kM;
  V16* z = work;             // H × 16: Z, then P
  V16* ds = z + H * kM;      // H × 16: dZ, then dS
  V16* s = ds + H * kM;      // 16 × H: S (MLP)
  V16* a1 = s + kM * H;      // 16 × F
  V16* a2 = a1 + kM * F;     // 16 × F
  V16* tmp = a2 + kM * F;    // 3H + 8H
  logits16<HC, D>(mlp, q, k, prev, noise, z, mlp ? s : nullptr, mlp ? a1 : nullptr, mlp ? a2 : nullptr, tmp, H, d,
                  scale);
  for (int64_t h = 0; h < H; ++h) {
    V16* p = z + h * kM;
    V16* dz = ds + h * kM;
    const float* gh = g + h * kM * dv;
    alignas(64) float pr[kM][kM], vt[kFastMaxDim][kM], delta[kM];
    load_t16(v + h * kM * dv, vt, dv, 1.0f);
    for (int64_t i = 0; i < kM; ++i) vstore(pr[i], p[i] - lse[h * kM + i]);
    for (int64_t i = 0; i < kM; ++i)
      for (int64_t j = 0; j < kM; ++j) pr[i][j] = exp_f32(pr[i][j]);
    V16 x[kM];
    for (int64_t i = 0; i < kM; ++i) {  // dP[i] = Σ_c gO[i, c] vᵀ[c]
      p[i] = vload(pr[i]);
      V16 acc = V16{};
      for (int64_t c = 0; c < dv; ++c) acc += gh[i * dv + c] * vload(vt[c]);
      dz[i] = acc;
      x[i] = p[i] * acc;
    }
    transpose16(x);  // rowsum(P ⊙ dP) for the 16 rows at once, over the keys in order
    V16 dl = x[0];
    for (int64_t j = 1; j < kM; ++j) dl += x[j];
    vstore(delta, dl);
    const float* gzh = gz ? gz + h * TT : nullptr;
    for (int64_t i = 0; i < kM; ++i) {
      const V16 t = p[i] * (dz[i] - delta[i]);
      dz[i] = gzh ? vload(gzh + i * kM) + t : t;
    }
  }
  if (mlp) {
    V16 *y = tmp, *du = y + H, *d1 = du + H, *d2 = d1 + F, *u = d2 + F;
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < kM; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        y[h] = ds[h * kM + i];
        u[h] = mask_neginf<float>(s[i * H + h]);
      }
      mlp_bwd<float, HC>(*mlp, u, a1 + i * F, a2 + i * F, y, d1, d2, du, G);
      for (int64_t h = 0; h < H; ++h) ds[h * kM + i] = y[h] + (s[i * H + h] == ninf ? V16{} : du[h]);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    V16* p = z + h * kM;
    V16* dsh = ds + h * kM;
    const float* qh = q + h * kM * d;
    const float* kh = k + h * kM * d;
    const float* gh = g + h * kM * dv;
    if (dprev)
      for (int64_t i = 0; i < kM; ++i) vstore(dprev + h * TT + i * kM, dsh[i]);
    alignas(64) float res[kFastMaxDim][kM];
    for (int64_t c = 0; c < dv; ++c) {  // dVᵀ[c] = Σ_i gO[i, c] P[i]
      V16 acc = V16{};
      for (int64_t i = 0; i < kM; ++i) acc += gh[i * dv + c] * p[i];
      vstore(res[c], acc);
    }
    store_t16(res, dvo + h * kM * dv, dv);
    for (int64_t c = 0; c < d; ++c) {  // dKᵀ[c] = scale Σ_i q[i, c] dS[i]
      V16 acc = V16{};
      for (int64_t i = 0; i < kM; ++i) acc += qh[i * d + c] * dsh[i];
      vstore(res[c], acc * scale);
    }
    store_t16(res, dk + h * kM * d, d);
    transpose16(dsh);  // dSᵀ: over the queries
    for (int64_t c = 0; c < d; ++c) {  // dQᵀ[c] = scale Σ_j k[j, c] dSᵀ[j]
      V16 acc = V16{};
      for (int64_t j = 0; j < kM; ++j) acc += kh[j * d + c] * dsh[j];
      vstore(res[c], acc * scale);
    }
    store_t16(res, dq + h * kM * d, d);
  }
}

int64_t fwd16_work_vectors(int64_t H) { return H * kM + 10 * H; }
int64_t bwd16_work_vectors(int64_t H) { return 2 * H * kM + kM * H + 2 * kM * 4 * H + 11 * H; }

TNT_TARGET_CLONES void fwd16(const MlpW<float>* mlp, const float* q, const float* k, const float* v, const float* prev,
                             const float* noise, float* out, float* logits, float* lse, V16* work, int64_t H, int64_t d,
                             int64_t dv, float scale) {
  if (H == 4 && d == 6 && dv == 6) fwd16_body<4, 6>(mlp, q, k, v, prev, noise, out, logits, lse, work, H, d, dv, scale);
  else fwd16_body<0, 0>(mlp, q, k, v, prev, noise, out, logits, lse, work, H, d, dv, scale);
}
TNT_TARGET_CLONES void bwd16(const MlpW<float>* mlp, const float* g, const float* gz, const float* q, const float* k,
                             const float* v, const float* prev, const float* noise, const float* lse, float* dq,
                             float* dk, float* dvo, float* dprev, V16* work, V16* G, int64_t H, int64_t d, int64_t dv,
                             float scale) {
  if (H == 4 && d == 6 && dv == 6)
    bwd16_body<4, 6>(mlp, g, gz, q, k, v, prev, noise, lse, dq, dk, dvo, dprev, work, G, H, d, dv, scale);
  else bwd16_body<0, 0>(mlp, g, gz, q, k, v, prev, noise, lse, dq, dk, dvo, dprev, work, G, H, d, dv, scale);
}

bool fast16(at::ScalarType t, int64_t T, int64_t d, int64_t dv) {
  return t == at::kFloat && T == kM && d <= kFastMaxDim && dv <= kFastMaxDim;
}

// ---- drivers ----------------------------------------------------------------------------------------

// Fixed chunks of sequences (depend on B only): at most 256 chunks, so at most 256 partial rows of MLP
// weight gradients.
int64_t chunk_size(int64_t B) { return std::max<int64_t>(1, (B + 255) / 256); }

// n elements at p in the accumulation type: p itself when scalar_t is acc_t, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* p, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    if (!p) return nullptr;
    buf.resize(n);
    load(p, buf.data(), n);
    return buf.data();
  }
}
// Where to write n outputs of type scalar_t in the accumulation type: dst itself or buf (then `finish`).
template <typename scalar_t, typename acc_t>
acc_t* out_acc(scalar_t* dst, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    if (!dst) return nullptr;
    buf.resize(n);
    return buf.data();
  }
}
template <typename scalar_t, typename acc_t>
void finish(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    if (dst) store(src, dst, n);
  }
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// dst (cols × ld) = srcᵀ, src (rows × cols) row-major; dst's columns from rows on stay as they are (zero).
template <typename acc_t>
void pad_t(const acc_t* src, acc_t* dst, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = src[r * cols + c];
}
// dst (rows × ld) = src (rows × cols) with zero columns from cols on.
template <typename acc_t>
void pad_rows(const acc_t* src, acc_t* dst, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld, src + r * cols, cols * sizeof(acc_t));
    for (int64_t c = cols; c < ld; ++c) dst[r * ld + c] = acc_t(0);
  }
}
// dst (rows × cols, scalar_t) = the first cols columns of src (rows × ld).
template <typename acc_t, typename scalar_t>
void unpad_rows(const acc_t* src, scalar_t* dst, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = static_cast<scalar_t>(src[r * ld + c]);
}

// n zeroed vectors of Vec<acc_t>, 64-byte aligned (a std::vector of the vector type would drop its
// alignment / aliasing attributes).
template <typename acc_t>
struct VecBuf {
  static constexpr int64_t C = Vec<acc_t>::C;
  std::vector<acc_t> s;
  acc_t* p;
  explicit VecBuf(int64_t n) : s(static_cast<size_t>((n + 1) * C), acc_t(0)) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(s.data());
    p = s.data() + ((64 - a % 64) % 64) / sizeof(acc_t);
  }
  VecT<acc_t>* data() { return reinterpret_cast<VecT<acc_t>*>(p); }
  const VecT<acc_t>* data() const { return reinterpret_cast<const VecT<acc_t>*>(p); }
};

template <typename scalar_t>
void nested_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* prev,
                       const std::vector<at::opmath_type<scalar_t>>& W, bool mlp, const scalar_t* noise, scalar_t* out,
                       scalar_t* logits, at::opmath_type<scalar_t>* lse, int64_t B, int64_t H, int64_t T, int64_t d,
                       int64_t dv, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t TT = T * T, chunk = chunk_size(B), n_chunks = (B + chunk - 1) / chunk;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const MlpW<acc_t> mw(W.data(), H);
  const MlpW<acc_t>* m = mlp ? &mw : nullptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (fast16(at::kFloat, T, d, dv)) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
        VecBuf<float> work(fwd16_work_vectors(H));
        for (int64_t b = cb * chunk; b < std::min(B, ce * chunk); ++b)
          fwd16(m, q + b * H * T * d, k + b * H * T * d, v + b * H * T * dv, prev ? prev + b * H * TT : nullptr,
                noise ? noise + b * H * TT : nullptr, out + b * H * T * dv, logits + b * H * TT, lse + b * H * T,
                work.data(), H, d, dv, scale);
      });
      return;
    }
  }
  constexpr int64_t C = Vec<acc_t>::C;
  const int64_t Tp = round_up(T, C), dvp = round_up(dv, C), SS = T * Tp;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> qb, kb, vb, pb, nbf, lb, sbuf(H * SS), bt(std::max(d, dv) * Tp, acc_t(0)), bp(T * dvp, acc_t(0)),
        ob(T * dvp);
    VecBuf<acc_t> blk(fwd_blk_vectors(H));
    for (int64_t b = cb * chunk; b < std::min(B, ce * chunk); ++b) {
      const acc_t* qa = as_acc(q + b * H * T * d, H * T * d, qb);
      const acc_t* ka = as_acc(k + b * H * T * d, H * T * d, kb);
      const acc_t* va = as_acc(v + b * H * T * dv, H * T * dv, vb);
      const acc_t* pa = prev ? as_acc(prev + b * H * TT, H * TT, pb) : nullptr;
      const acc_t* na = noise ? as_acc(noise + b * H * TT, H * TT, nbf) : nullptr;
      acc_t* la = out_acc(logits + b * H * TT, H * TT, lb);
      for (int64_t h = 0; h < H; ++h) {  // S = q kᵀ (unscaled; the row pass scales)
        pad_t(ka + h * T * d, bt.data(), T, d, Tp);
        gemm_any(T, Tp, d, qa + h * T * d, d, 1, bt.data(), Tp, sbuf.data() + h * SS, Tp, acc_t(1));
      }
      for (int64_t i = 0; i < T; ++i)
        fwd_row_any(m, sbuf.data() + i * Tp, pa ? pa + i * T : nullptr, na ? na + i * T : nullptr, la + i * T,
                    lse + b * H * T + i, RowShape{H, T, TT, SS}, scale, blk.data());
      for (int64_t h = 0; h < H; ++h) {  // out = P v
        pad_rows(va + h * T * dv, bp.data(), T, dv, dvp);
        gemm_any(T, dvp, T, sbuf.data() + h * SS, Tp, 1, bp.data(), dvp, ob.data(), dvp, acc_t(1));
        unpad_rows(ob.data(), out + (b * H + h) * T * dv, T, dv, dvp);
      }
      finish(la, logits + b * H * TT, H * TT);
    }
  });
}

template <typename scalar_t>
void nested_bwd_kernel(const scalar_t* gout, const scalar_t* gz, const scalar_t* q, const scalar_t* k,
                       const scalar_t* v, const scalar_t* prev, const std::vector<at::opmath_type<scalar_t>>& W,
                       bool mlp, const scalar_t* noise, const at::opmath_type<scalar_t>* lse, scalar_t* dq,
                       scalar_t* dk, scalar_t* dvo, scalar_t* dprev, at::opmath_type<scalar_t>* partial,
                       int64_t chunk, int64_t n_chunks, int64_t B, int64_t H, int64_t T, int64_t d, int64_t dv,
                       double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t C = Vec<acc_t>::C;
  const int64_t TT = T * T, P = static_cast<int64_t>(W.size());
  const acc_t scale = static_cast<acc_t>(scale_d);
  const MlpW<acc_t> mw(W.data(), H);
  const MlpW<acc_t>* m = mlp ? &mw : nullptr;
  // The chunk's lane accumulators, reduced over the lanes in order into its partial row.
  auto flush = [&](const VecBuf<acc_t>& G, int64_t ch) {
    if (!mlp) return;
    for (int64_t x = 0; x < P; ++x) partial[ch * P + x] = hsum<acc_t>(G.data()[x]);
  };
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (fast16(at::kFloat, T, d, dv)) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
        VecBuf<float> work(bwd16_work_vectors(H));
        for (int64_t ch = cb; ch < ce; ++ch) {
          VecBuf<float> G(mlp ? P : 0);
          for (int64_t b = ch * chunk; b < std::min(B, (ch + 1) * chunk); ++b)
            bwd16(m, gout + b * H * T * dv, gz ? gz + b * H * TT : nullptr, q + b * H * T * d, k + b * H * T * d,
                  v + b * H * T * dv, prev ? prev + b * H * TT : nullptr, noise ? noise + b * H * TT : nullptr,
                  lse + b * H * T, dq + b * H * T * d, dk + b * H * T * d, dvo + b * H * T * dv,
                  dprev ? dprev + b * H * TT : nullptr, work.data(), G.data(), H, d, dv, scale);
          flush(G, ch);
        }
      });
      return;
    }
  }
  const int64_t Tp = round_up(T, C), dp_ = round_up(d, C), dvp = round_up(dv, C), SS = T * Tp,
                np_ = std::max(dp_, dvp);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> qb, kb, vb, gb, pb, nbf, gzb, dpb, sbuf(H * SS), dpbuf(H * SS),
        bt(std::max(d, dv) * Tp, acc_t(0)), bp(T * np_, acc_t(0)), ob(T * np_);
    VecBuf<acc_t> blk(bwd_blk_vectors(H, T, C));
    for (int64_t ch = cb; ch < ce; ++ch) {
      VecBuf<acc_t> G(mlp ? P : 0);
      for (int64_t b = ch * chunk; b < std::min(B, (ch + 1) * chunk); ++b) {
        const acc_t* qa = as_acc(q + b * H * T * d, H * T * d, qb);
        const acc_t* ka = as_acc(k + b * H * T * d, H * T * d, kb);
        const acc_t* va = as_acc(v + b * H * T * dv, H * T * dv, vb);
        const acc_t* ga = as_acc(gout + b * H * T * dv, H * T * dv, gb);
        const acc_t* pa = prev ? as_acc(prev + b * H * TT, H * TT, pb) : nullptr;
        const acc_t* na = noise ? as_acc(noise + b * H * TT, H * TT, nbf) : nullptr;
        const acc_t* gza = gz ? as_acc(gz + b * H * TT, H * TT, gzb) : nullptr;
        acc_t* dpa = dprev ? out_acc(dprev + b * H * TT, H * TT, dpb) : nullptr;
        for (int64_t h = 0; h < H; ++h) {  // S = q kᵀ as the forward;  dP = gO vᵀ
          pad_t(ka + h * T * d, bt.data(), T, d, Tp);
          gemm_any(T, Tp, d, qa + h * T * d, d, 1, bt.data(), Tp, sbuf.data() + h * SS, Tp, acc_t(1));
          pad_t(va + h * T * dv, bt.data(), T, dv, Tp);
          gemm_any(T, Tp, dv, ga + h * T * dv, dv, 1, bt.data(), Tp, dpbuf.data() + h * SS, Tp, acc_t(1));
        }
        for (int64_t i = 0; i < T; ++i)
          bwd_row_any(m, sbuf.data() + i * Tp, dpbuf.data() + i * Tp, pa ? pa + i * T : nullptr,
                      na ? na + i * T : nullptr, gza ? gza + i * T : nullptr, lse + b * H * T + i,
                      dpa ? dpa + i * T : nullptr, RowShape{H, T, TT, SS}, scale, blk.data(), G.data());
        for (int64_t h = 0; h < H; ++h) {  // dV = Pᵀ gO;  dQ = scale dS k;  dK = scale dSᵀ q
          const acc_t* Ph = sbuf.data() + h * SS;
          const acc_t* dSh = dpbuf.data() + h * SS;
          const int64_t o = (b * H + h) * T;
          pad_rows(ga + h * T * dv, bp.data(), T, dv, dvp);
          gemm_any(T, dvp, T, Ph, 1, Tp, bp.data(), dvp, ob.data(), dvp, acc_t(1));
          unpad_rows(ob.data(), dvo + o * dv, T, dv, dvp);
          pad_rows(ka + h * T * d, bp.data(), T, d, dp_);
          gemm_any(T, dp_, T, dSh, Tp, 1, bp.data(), dp_, ob.data(), dp_, scale);
          unpad_rows(ob.data(), dq + o * d, T, d, dp_);
          pad_rows(qa + h * T * d, bp.data(), T, d, dp_);
          gemm_any(T, dp_, T, dSh, 1, Tp, bp.data(), dp_, ob.data(), dp_, scale);
          unpad_rows(ob.data(), dk + o * d, T, d, dp_);
        }
        if (dpa) finish(dpa, dprev + b * H * TT, H * TT);
      }
      flush(G, ch);
    }
  });
}

// The six MLP tensors flattened into one vector in the accumulation type: w1 b1 w2 b2 w3 b3.
template <typename acc_t>
std::vector<acc_t> flat_weights(at::TensorList head_mlp) {
  std::vector<acc_t> W;
  for (const auto& t : head_mlp) {
    const std::vector<acc_t> w = to_vec<acc_t>(t);
    W.insert(W.end(), w.begin(), w.end());
  }
  return W;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nested_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& prev_in,
    at::TensorList head_mlp, const c10::optional<at::Tensor>& noise_in, double scale) {
  check_nested_attention_inputs(q_in, k_in, v_in, prev_in, head_mlp, noise_in);
  TNT_CHECK_DEVICE(q_in, at::Device(at::kCPU));
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor prev = prev_in.has_value() ? prev_in->contiguous() : at::Tensor();
  const at::Tensor noise = noise_in.has_value() ? noise_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), dv = v.size(3);
  const bool mlp = prev.defined() && head_mlp.size() == 6;
  at::Tensor out = at::empty({B, H, T, dv}, q.options());
  at::Tensor logits = at::empty({B, H, T, T}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (B * H * T == 0) return {out, logits, lse};
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "nested_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> W = mlp ? flat_weights<acc_t>(head_mlp) : std::vector<acc_t>();
    nested_fwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                prev.defined() ? prev.data_ptr<scalar_t>() : nullptr, W, mlp,
                                noise.defined() ? noise.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), B, H, T, d, dv, scale);
  });
  return {out, logits, lse};
}

std::vector<at::Tensor> nested_attention_backward_cpu(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_logits_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& prev_in, at::TensorList head_mlp,
    const c10::optional<at::Tensor>& noise_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_nested_attention_backward_inputs(grad_out_in, grad_logits_in, q_in, k_in, v_in, prev_in, head_mlp, noise_in,
                                         out_in, lse_in);
  TNT_CHECK_DEVICE(q_in, at::Device(at::kCPU));
  const at::Tensor g = grad_out_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   lse = lse_in.contiguous();
  const at::Tensor noise = noise_in.has_value() ? noise_in->contiguous() : at::Tensor();
  const at::Tensor gz = grad_logits_in.has_value() ? grad_logits_in->contiguous() : at::Tensor();
  const at::Tensor prev = prev_in.has_value() ? prev_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), dv = v.size(3);
  const bool mlp = prev.defined() && head_mlp.size() == 6;
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dvt = at::empty_like(v);
  at::Tensor dprev = prev.defined() ? at::empty_like(prev) : at::empty({0}, q.options());
  std::vector<at::Tensor> result = {dq, dk, dvt, dprev};
  const int64_t n_params = 24 * H * H + 9 * H;
  const int64_t chunk = chunk_size(B);
  const int64_t n_chunks = B == 0 ? 0 : (B + chunk - 1) / chunk;
  at::Tensor partial = at::zeros({mlp ? n_chunks : 0, n_params},
                                 q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (B * H * T > 0) {
    TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "nested_attention_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const std::vector<acc_t> W = mlp ? flat_weights<acc_t>(head_mlp) : std::vector<acc_t>();
      nested_bwd_kernel<scalar_t>(g.data_ptr<scalar_t>(), gz.defined() ? gz.data_ptr<scalar_t>() : nullptr,
                                  q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                  prev.defined() ? prev.data_ptr<scalar_t>() : nullptr, W, mlp,
                                  noise.defined() ? noise.data_ptr<scalar_t>() : nullptr, lse.data_ptr<acc_t>(),
                                  dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dvt.data_ptr<scalar_t>(),
                                  prev.defined() ? dprev.data_ptr<scalar_t>() : nullptr,
                                  mlp ? partial.data_ptr<acc_t>() : nullptr, chunk, n_chunks, B, H, T, d, dv, scale);
    });
  }
  if (mlp) {
    // Sum the chunk rows in chunk order (serial over chunks, so independent of the thread count).
    at::Tensor total = at::zeros({n_params}, partial.options());
    AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "nested_attention_wsum", [&] {
      scalar_t* t = total.data_ptr<scalar_t>();
      const scalar_t* p = partial.data_ptr<scalar_t>();
      for (int64_t c = 0; c < n_chunks; ++c)
        for (int64_t x = 0; x < n_params; ++x) t[x] += p[c * n_params + x];
    });
    append_head_mlp_grads(result, total, head_mlp, q.scalar_type());
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CPU, m) {
  m.impl("nested_attention", &nested_attention_cpu);
  m.impl("nested_attention_backward", &nested_attention_backward_cpu);
}

}  // namespace tntkernels

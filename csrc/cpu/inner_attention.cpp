// Batched inner-block attention on CPU: softmax(q kᵀ · scale) v over (S, H, m, d) sequences.
//
// at::parallel_for over the S·H (sequence, head) pairs; every pair is independent and each output
// element is written by exactly one task, so results are deterministic. Per pair, the inputs are
// copied into per-thread buffers in the accumulation type (float for float16 / bfloat16 / float32,
// double for float64), laid out so that every inner loop runs over the m tokens and vectorizes: the
// forward keeps the scores transposed (keys × queries), so the softmax's max and sum over the keys
// are element-wise over the queries (no serial reductions); the backward keeps k, v and the
// gradients transposed (head_dim × m). The float path is compiled once per ISA level
// (TNT_TARGET_CLONES, chosen at load time) and uses a branch-free exp and log that vectorize.
//
//   forward:  S = q kᵀ·scale;  P = softmax_rows(S);  out = P v;  lse_i = log Σ_j exp(S_ij)
//   backward: P = exp(S − lse);  dP = dO vᵀ;  dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale
//             dQ = dS k;  dK = dSᵀ q;  dV = Pᵀ dO
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
#include "tntkernels/inner_attention.h"

namespace tntkernels {
namespace {

// Per-thread scratch for one (sequence, head) pair; sizes grow to the largest pair seen.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, kt, vt, s, st, g, gt, o, dqt, dkt, dvt, qt, k, v, mx, sum;
  void resize(int64_t m, int64_t d, int64_t dv) {
    for (auto* b : {&q, &kt, &dqt, &dkt, &qt, &k}) b->resize(m * d);
    for (auto* b : {&vt, &g, &gt, &o, &dvt, &v}) b->resize(m * dv);
    s.resize(m * m);
    st.resize(m * m);
    mx.resize(m);
    sum.resize(m);
  }
};

// dst = src (rows × cols, row-major) converted, or its transpose (cols × rows).
template <typename scalar_t, typename acc_t>
TNT_INLINE void load_matrix(const scalar_t* src, acc_t* dst, int64_t rows, int64_t cols, bool transpose) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[transpose ? c * rows + r : r * cols + c] = acc_t(src[r * cols + c]);
}

// Pair `pair`'s q (m × d), kᵀ (d × m) and vᵀ (dv × m) into w.
template <typename scalar_t, typename acc_t>
TNT_INLINE void load_qkv(Scratch<acc_t>& w, const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t pair,
                         int64_t m, int64_t d, int64_t dv) {
  load_matrix(q + pair * m * d, w.q.data(), m, d, false);
  load_matrix(k + pair * m * d, w.kt.data(), m, d, true);
  load_matrix(v + pair * m * dv, w.vt.data(), m, dv, true);
}

// s (m × m) = q (m × d) · kt·scale, rows over queries, kt (d × m).
template <typename acc_t>
TNT_INLINE void scores(const acc_t* __restrict__ q, const acc_t* __restrict__ kt, acc_t* __restrict__ s, int64_t m,
                       int64_t d, acc_t scale) {
  for (int64_t i = 0; i < m; ++i) {
    acc_t* si = s + i * m;
    for (int64_t j = 0; j < m; ++j) si[j] = 0;
    for (int64_t c = 0; c < d; ++c) {
      const acc_t qc = q[i * d + c] * scale;
      axpy(si, qc, kt + c * m, m);
    }
  }
}

// out (rows × n) = a (rows × k) · b (k × n), all row-major; the inner loop runs over n.
template <typename acc_t>
TNT_INLINE void matmul_rows(const acc_t* __restrict__ a, const acc_t* __restrict__ b, acc_t* __restrict__ out,
                            int64_t rows, int64_t k, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* o = out + r * n;
    for (int64_t j = 0; j < n; ++j) o[j] = 0;
    for (int64_t x = 0; x < k; ++x) {
      axpy(o, a[r * k + x], b + x * n, n);
    }
  }
}

template <typename acc_t>
TNT_INLINE void transpose(const acc_t* __restrict__ src, acc_t* __restrict__ dst, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// Pair `pair`'s qᵀ (d × m), k (m × d) and v (m × dv) into w, for the forward.
template <typename scalar_t, typename acc_t>
TNT_INLINE void load_qkv_forward(Scratch<acc_t>& w, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                 int64_t pair, int64_t m, int64_t d, int64_t dv) {
  load_matrix(q + pair * m * d, w.qt.data(), m, d, true);
  load_matrix(k + pair * m * d, w.k.data(), m, d, false);
  load_matrix(v + pair * m * dv, w.v.data(), m, dv, false);
}

// qᵀ·scale in place: the forward's products are then k·(q·scale), the ones the backward's `scores`
// forms, so its P = exp(S − lse) rounds as the forward's softmax did.
template <typename acc_t>
TNT_INLINE void scale_in_place(acc_t* x, int64_t n, acc_t scale) {
  for (int64_t i = 0; i < n; ++i) x[i] *= scale;
}

// One pair, forward, on the scores transposed (keys × queries), so every loop below runs over the
// queries and vectorizes, the max and sum over the keys included (per query, in key order: the
// same order for any thread count): fills o with outᵀ (dv × m) and lse (m).
template <typename acc_t>
TNT_INLINE void pair_forward(Scratch<acc_t>& w, acc_t* lse, int64_t m, int64_t d, int64_t dv, acc_t scale) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t* __restrict__ st = w.st.data();
  acc_t* __restrict__ mx = w.mx.data();
  acc_t* __restrict__ sum = w.sum.data();
  scale_in_place(w.qt.data(), d * m, scale);
  for (int64_t j = 0; j < m; ++j) {  // Sᵀ[j, :] = Σ_c k[j, c] · (qᵀ·scale)[c, :]
    acc_t* sj = st + j * m;
    for (int64_t i = 0; i < m; ++i) sj[i] = 0;
    for (int64_t c = 0; c < d; ++c) axpy(sj, w.k[j * d + c], w.qt.data() + c * m, m);
  }
  for (int64_t i = 0; i < m; ++i) mx[i] = -inf;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < m; ++i) mx[i] = st[j * m + i] > mx[i] ? st[j * m + i] : mx[i];
  for (int64_t i = 0; i < m; ++i) mx[i] = mx[i] == -inf ? acc_t(0) : mx[i];  // a fully masked row: no inf − inf
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < m; ++i) st[j * m + i] = exp_acc(st[j * m + i] - mx[i]);
  for (int64_t i = 0; i < m; ++i) sum[i] = 0;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < m; ++i) sum[i] += st[j * m + i];
  for (int64_t i = 0; i < m; ++i) lse[i] = mx[i] + log_acc(sum[i]);
  for (int64_t i = 0; i < m; ++i) sum[i] = acc_t(1) / sum[i];
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < m; ++i) st[j * m + i] *= sum[i];  // Pᵀ
  for (int64_t c = 0; c < dv; ++c) {  // outᵀ[c, :] = Σ_j v[j, c] · Pᵀ[j, :]
    acc_t* oc = w.o.data() + c * m;
    for (int64_t i = 0; i < m; ++i) oc[i] = 0;
    for (int64_t j = 0; j < m; ++j) axpy(oc, w.v[j * dv + c], st + j * m, m);
  }
}

// One pair, backward, given q, kt, vt, g = dO (m × dv), gt = dOᵀ, o = outᵀ (dv × m) and lse:
// writes dqt (d × m), dkt (d × m), dvt (dv × m).
template <typename acc_t>
TNT_INLINE void pair_backward(Scratch<acc_t>& w, const acc_t* lse, int64_t m, int64_t d, int64_t dv, acc_t scale) {
  acc_t* P = w.s.data();
  acc_t* dS = w.st.data();
  scores(w.q.data(), w.kt.data(), P, m, d, scale);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) P[i * m + j] = exp_acc(P[i * m + j] - lse[i]);
  matmul_rows(w.g.data(), w.vt.data(), dS, m, dv, m);  // dP = dO vᵀ (m × m)
  for (int64_t i = 0; i < m; ++i) {
    acc_t Di = 0;  // Σ_j P_ij dP_ij = dO_i · O_i
    for (int64_t c = 0; c < dv; ++c) Di += w.g[i * dv + c] * w.o[c * m + i];
    for (int64_t j = 0; j < m; ++j) dS[i * m + j] = P[i * m + j] * (dS[i * m + j] - Di) * scale;
  }
  // dVᵀ (dv × m) = dOᵀ P;  dKᵀ (d × m) = qᵀ dS;  dQᵀ (d × m) = kᵀ dSᵀ
  matmul_rows(w.gt.data(), P, w.dvt.data(), dv, m, m);
  transpose(w.q.data(), w.dqt.data(), m, d);  // qᵀ, borrowed buffer
  matmul_rows(w.dqt.data(), dS, w.dkt.data(), d, m, m);
  transpose(dS, P, m, m);  // dSᵀ into P's buffer (P no longer needed)
  matmul_rows(w.kt.data(), P, w.dqt.data(), d, m, m);
}

// m = 16 (TNT's 4×4 words) is passed as a compile-time constant so its loops unroll exactly.
TNT_TARGET_CLONES void pair_forward_f32(Scratch<float>& w, float* lse, int64_t m, int64_t d, int64_t dv, float scale) {
  if (m == 16) pair_forward<float>(w, lse, 16, d, dv, scale);
  else pair_forward<float>(w, lse, m, d, dv, scale);
}
TNT_TARGET_CLONES void pair_backward_f32(Scratch<float>& w, const float* lse, int64_t m, int64_t d, int64_t dv,
                                         float scale) {
  if (m == 16) pair_backward<float>(w, lse, 16, d, dv, scale);
  else pair_backward<float>(w, lse, m, d, dv, scale);
}
void pair_forward_any(Scratch<float>& w, float* lse, int64_t m, int64_t d, int64_t dv, float scale) {
  pair_forward_f32(w, lse, m, d, dv, scale);
}
void pair_forward_any(Scratch<double>& w, double* lse, int64_t m, int64_t d, int64_t dv, double scale) {
  pair_forward<double>(w, lse, m, d, dv, scale);
}
void pair_backward_any(Scratch<float>& w, const float* lse, int64_t m, int64_t d, int64_t dv, float scale) {
  pair_backward_f32(w, lse, m, d, dv, scale);
}
void pair_backward_any(Scratch<double>& w, const double* lse, int64_t m, int64_t d, int64_t dv, double scale) {
  pair_backward<double>(w, lse, m, d, dv, scale);
}

// ---- m = 16 (TNT's 4×4 words) in float: one 16-lane vector per row of the 16×16 tile --------------
// The tile's rows live in GCC vectors of 16 floats (Vec<float>: one zmm in the AVX-512 clone), indexed
// by the queries (the forward's scores transposed, keys × queries) or by the keys; every GEMM is a
// broadcast-FMA over such rows, accumulated in registers; exp / log run as loops over stack arrays
// that vectorize. Inputs of one pair are read straight from the contiguous (m, d) rows, no scratch.
constexpr int64_t kFastMaxDim = 64;  // d, dv of the fast path (TNT's inner 6 / 10, RTNT's letters)
// st[j] = Σ_c k[j, c] · qt[c]: the scores transposed (keys × queries), qt already scaled.
TNT_INLINE void scores_t16(const float* __restrict__ k, const float (*__restrict__ qt)[kM], float (*__restrict__ st)[kM],
                           int64_t d) {
  for (int64_t j = 0; j < kM; ++j) {
    V16 acc = V16{};
    for (int64_t c = 0; c < d; ++c) acc += k[j * d + c] * vload(qt[c]);
    vstore(st[j], acc);
  }
}

// load_t16 / store_t16, through registers where the head dim is a compile-time constant <= 16.
template <int64_t D>
TNT_INLINE void load_t(const float* src, float (*dst)[kM], int64_t d, float mul) {
  if constexpr (D > 0 && D <= kM) load_t16_fixed<D>(src, dst, mul);
  else load_t16(src, dst, d, mul);
}
template <int64_t D>
TNT_INLINE void store_t(const float (*src)[kM], float* dst, int64_t d) {
  if constexpr (D > 0 && D <= kM) store_t16_fixed<D>(src, dst);
  else store_t16(src, dst, d);
}

// One pair, forward. q, k: (16, d), v: (16, dv), out: (16, dv), row-major; lse: 16 floats.
// D, DV > 0: head dims fixed at compile time (the loops over them unroll); 0: the runtime d, dv.
template <int64_t D, int64_t DV>
TNT_INLINE void pair_forward16_body(const float* q, const float* k, const float* v, float* out, float* lse, int64_t d_rt, int64_t dv_rt, float scale) {
  const int64_t d = D > 0 ? D : d_rt, dv = DV > 0 ? DV : dv_rt;
  alignas(64) float qt[kFastMaxDim][kM], p[kM][kM], ot[kFastMaxDim][kM], mx[kM], sum[kM];
  load_t<D>(q, qt, d, scale);
  scores_t16(k, qt, p, d);
  const float inf = std::numeric_limits<float>::infinity();
  V16 m = vload(p[0]);
  for (int64_t j = 1; j < kM; ++j) {
    const V16 s = vload(p[j]);
    m = s > m ? s : m;
  }
  m = m == -inf ? V16{} : m;  // a fully masked row: shift by 0, no inf − inf
  vstore(mx, m);
  for (int64_t j = 0; j < kM; ++j)
    for (int64_t i = 0; i < kM; ++i) p[j][i] = exp_f32(p[j][i] - mx[i]);
  V16 s = V16{};
  for (int64_t j = 0; j < kM; ++j) s += vload(p[j]);  // per query, in key order
  vstore(sum, s);
  for (int64_t i = 0; i < kM; ++i) lse[i] = mx[i] + log_f32(sum[i]);
  const V16 inv = 1.0f / s;
  for (int64_t c = 0; c < dv; ++c) {  // outᵀ[c] = (Σ_j v[j, c] · Pᵀ[j]) / sum
    V16 acc = V16{};
    for (int64_t j = 0; j < kM; ++j) acc += v[j * dv + c] * vload(p[j]);
    vstore(ot[c], acc * inv);
  }
  store_t<DV>(ot, out, dv);
}

TNT_TARGET_CLONES void pair_forward16(const float* q, const float* k, const float* v, float* out, float* lse,
                                      int64_t d, int64_t dv, float scale) {
  if (d == 6 && dv == 6) pair_forward16_body<6, 6>(q, k, v, out, lse, d, dv, scale);  // TNT-S
  else if (d == 10 && dv == 10) pair_forward16_body<10, 10>(q, k, v, out, lse, d, dv, scale);  // TNT-B
  else pair_forward16_body<0, 0>(q, k, v, out, lse, d, dv, scale);
}

// One pair, backward, on vectors over the keys (rows of S, P, dS indexed by the query): dK and dV
// are broadcast-FMAs over those rows; dQ takes dSᵀ, one register transpose. g = dO, o = out: (16, dv);
// lse: 16 floats; writes dq, dk (16, d), dvo (16, dv).
// D, DV > 0: head dims fixed at compile time (the loops over them unroll); 0: the runtime d, dv.
template <int64_t D, int64_t DV>
TNT_INLINE void pair_backward16_body(const float* g, const float* q, const float* k, const float* v, const float* o, const float* lse, float* dq, float* dk, float* dvo, int64_t d_rt, int64_t dv_rt, float scale) {
  const int64_t d = D > 0 ? D : d_rt, dv = DV > 0 ? DV : dv_rt;
  alignas(64) float kt[kFastMaxDim][kM], vt[kFastMaxDim][kM], p[kM][kM], res[kFastMaxDim][kM];
  load_t<D>(k, kt, d, 1.0f);
  load_t<DV>(v, vt, dv, 1.0f);
  for (int64_t i = 0; i < kM; ++i) {  // S[i] = Σ_c (q[i, c]·scale) kᵀ[c]: the forward's products and order
    V16 acc = V16{};
    for (int64_t c = 0; c < d; ++c) acc += (q[i * d + c] * scale) * vload(kt[c]);
    vstore(p[i], acc - lse[i]);
  }
  for (int64_t i = 0; i < kM; ++i)
    for (int64_t j = 0; j < kM; ++j) p[i][j] = exp_f32(p[i][j]);  // P
  V16 ds[kM];
  for (int64_t i = 0; i < kM; ++i) {  // dS[i] = P[i] ⊙ (dP[i] − delta_i)·scale, dP[i] = Σ_c dO[i, c] vᵀ[c]
    float delta = 0.0f;  // rowsum(dO ⊙ out)
    for (int64_t c = 0; c < dv; ++c) delta += g[i * dv + c] * o[i * dv + c];
    V16 dp = V16{};
    for (int64_t c = 0; c < dv; ++c) dp += g[i * dv + c] * vload(vt[c]);
    ds[i] = vload(p[i]) * (dp - delta) * scale;
  }
  for (int64_t c = 0; c < d; ++c) {  // dKᵀ[c] = Σ_i q[i, c] dS[i]
    V16 acc = V16{};
    for (int64_t i = 0; i < kM; ++i) acc += q[i * d + c] * ds[i];
    vstore(res[c], acc);
  }
  store_t<D>(res, dk, d);
  for (int64_t c = 0; c < dv; ++c) {  // dVᵀ[c] = Σ_i dO[i, c] P[i]
    V16 acc = V16{};
    for (int64_t i = 0; i < kM; ++i) acc += g[i * dv + c] * vload(p[i]);
    vstore(res[c], acc);
  }
  store_t<DV>(res, dvo, dv);
  transpose16(ds);  // dSᵀ: ds[j] over the queries
  for (int64_t c = 0; c < d; ++c) {  // dQᵀ[c] = Σ_j k[j, c] dSᵀ[j]
    V16 acc = V16{};
    for (int64_t j = 0; j < kM; ++j) acc += k[j * d + c] * ds[j];
    vstore(res[c], acc);
  }
  store_t<D>(res, dq, d);
}

TNT_TARGET_CLONES void pair_backward16(const float* g, const float* q, const float* k, const float* v, const float* o,
                                       const float* lse, float* dq, float* dk, float* dvo, int64_t d, int64_t dv,
                                       float scale) {
  if (d == 6 && dv == 6) pair_backward16_body<6, 6>(g, q, k, v, o, lse, dq, dk, dvo, d, dv, scale);  // TNT-S
  else if (d == 10 && dv == 10) pair_backward16_body<10, 10>(g, q, k, v, o, lse, dq, dk, dvo, d, dv, scale);  // TNT-B
  else pair_backward16_body<0, 0>(g, q, k, v, o, lse, dq, dk, dvo, d, dv, scale);
}

bool fast16(int64_t m, int64_t d, int64_t dv) { return m == kM && d <= kFastMaxDim && dv <= kFastMaxDim; }

// f(w, pair) for every (sequence, head) pair, over at::parallel_for tasks, each with its own scratch w.
template <typename acc_t, typename F>
void for_each_pair(int64_t pairs, int64_t m, int64_t d, int64_t dv, const F& f) {
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w;
    w.resize(m, d, dv);
    for (int64_t pair = begin; pair < end; ++pair) f(w, pair);
  });
}

template <typename scalar_t>
void inner_attention_fwd_cpu_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                                    at::opmath_type<scalar_t>* lse, int64_t pairs, int64_t m, int64_t d,
                                    int64_t dv, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (fast16(m, d, dv)) {
      at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
        for (int64_t pair = begin; pair < end; ++pair)
          pair_forward16(q + pair * m * d, k + pair * m * d, v + pair * m * dv, out + pair * m * dv, lse + pair * m,
                         d, dv, static_cast<float>(scale));
      });
      return;
    }
  }
  for_each_pair<acc_t>(pairs, m, d, dv, [&](Scratch<acc_t>& w, int64_t pair) {
    load_qkv_forward(w, q, k, v, pair, m, d, dv);
    pair_forward_any(w, lse + pair * m, m, d, dv, static_cast<acc_t>(scale));
    scalar_t* o = out + pair * m * dv;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < dv; ++c) o[i * dv + c] = static_cast<scalar_t>(w.o[c * m + i]);
  });
}

template <typename scalar_t>
void inner_attention_bwd_cpu_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                    const scalar_t* out, const at::opmath_type<scalar_t>* lse, scalar_t* dq,
                                    scalar_t* dk, scalar_t* dv_out, int64_t pairs, int64_t m, int64_t d, int64_t dv,
                                    double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (fast16(m, d, dv)) {
      at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
        for (int64_t pair = begin; pair < end; ++pair)
          pair_backward16(dout + pair * m * dv, q + pair * m * d, k + pair * m * d, v + pair * m * dv,
                          out + pair * m * dv, lse + pair * m, dq + pair * m * d, dk + pair * m * d,
                          dv_out + pair * m * dv, d, dv, static_cast<float>(scale));
      });
      return;
    }
  }
  for_each_pair<acc_t>(pairs, m, d, dv, [&](Scratch<acc_t>& w, int64_t pair) {
    load_qkv(w, q, k, v, pair, m, d, dv);
    load_matrix(dout + pair * m * dv, w.g.data(), m, dv, false);
    load_matrix(dout + pair * m * dv, w.gt.data(), m, dv, true);
    load_matrix(out + pair * m * dv, w.o.data(), m, dv, true);
    pair_backward_any(w, lse + pair * m, m, d, dv, static_cast<acc_t>(scale));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t c = 0; c < d; ++c) {
        dq[(pair * m + i) * d + c] = static_cast<scalar_t>(w.dqt[c * m + i]);
        dk[(pair * m + i) * d + c] = static_cast<scalar_t>(w.dkt[c * m + i]);
      }
      for (int64_t c = 0; c < dv; ++c) dv_out[(pair * m + i) * dv + c] = static_cast<scalar_t>(w.dvt[c * m + i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> inner_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, double scale) {
  check_inner_attention_inputs(q_in, k_in, v_in);
  TNT_CHECK_DEVICE(q_in, at::Device(at::kCPU));
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t S = q.size(0), H = q.size(1), m = q.size(2), d = q.size(3), dv = v.size(3);
  at::Tensor out = at::empty({S, H, m, dv}, q.options());
  at::Tensor lse = at::empty({S, H, m}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (S * H * m == 0) return {out, lse};
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "inner_attention_cpu", [&] {
    inner_attention_fwd_cpu_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                             out.data_ptr<scalar_t>(), lse.data_ptr<at::opmath_type<scalar_t>>(),
                                             S * H, m, d, dv, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_inner_attention_backward_inputs(grad_out_in, q_in, k_in, v_in, out_in, lse_in);
  TNT_CHECK_DEVICE(q_in, at::Device(at::kCPU));
  const at::Tensor g = grad_out_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v = v_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const int64_t S = q.size(0), H = q.size(1), m = q.size(2), d = q.size(3), dv = v.size(3);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dvt = at::empty_like(v);
  if (S * H * m == 0) return {dq, dk, dvt};
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "inner_attention_backward_cpu", [&] {
    inner_attention_bwd_cpu_kernel<scalar_t>(
        g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), lse.data_ptr<at::opmath_type<scalar_t>>(), dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(), dvt.data_ptr<scalar_t>(), S * H, m, d, dv, scale);
  });
  return {dq, dk, dvt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CPU, m) {
  m.impl("inner_attention", &inner_attention_cpu);
  m.impl("inner_attention_backward", &inner_attention_backward_cpu);
}

}  // namespace tntkernels

// Batched inner-block attention on CPU: softmax(q kᵀ · scale) v over (S, H, m, d) sequences.
//
// at::parallel_for over the S·H (sequence, head) pairs; every pair is independent and each output
// element is written by exactly one task, so results are deterministic. Per pair, the inputs are
// copied into per-thread buffers in the accumulation type (float for float16 / bfloat16 / float32,
// double for float64), with k, v and the gradients kept transposed (head_dim × m) so that every
// inner loop runs over the m tokens and vectorizes; the float path is compiled once per ISA level
// (TNT_TARGET_CLONES, chosen at load time) and uses a branch-free exp that vectorizes.
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
#include <vector>

#include "tntkernels/cpu_vec.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/inner_attention.h"

namespace tntkernels {
namespace {

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
TNT_INLINE double exp_acc(double x) { return std::exp(x); }
TNT_INLINE float exp_acc(float x) { return exp_f32(x); }

// Per-thread scratch for one (sequence, head) pair; sizes grow to the largest pair seen.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, kt, vt, s, st, g, gt, o, dqt, dkt, dvt;
  void resize(int64_t m, int64_t d, int64_t dv) {
    for (auto* b : {&q, &kt, &dqt, &dkt}) b->resize(m * d);
    for (auto* b : {&vt, &g, &gt, &o, &dvt}) b->resize(m * dv);
    s.resize(m * m);
    st.resize(m * m);
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

// One pair, forward: fills s with P (m × m), ot (dv × m) with outᵀ, lse (m).
template <typename acc_t>
TNT_INLINE void pair_forward(Scratch<acc_t>& w, acc_t* lse, int64_t m, int64_t d, int64_t dv, acc_t scale) {
  scores(w.q.data(), w.kt.data(), w.s.data(), m, d, scale);
  for (int64_t i = 0; i < m; ++i) {
    acc_t* si = w.s.data() + i * m;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < m; ++j) mx = si[j] > mx ? si[j] : mx;
    const acc_t shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
    for (int64_t j = 0; j < m; ++j) si[j] = exp_acc(si[j] - shift);
    acc_t sum = 0;
    for (int64_t j = 0; j < m; ++j) sum += si[j];
    const acc_t inv = acc_t(1) / sum;
    for (int64_t j = 0; j < m; ++j) si[j] *= inv;
    lse[i] = shift + std::log(sum);
  }
  transpose(w.s.data(), w.st.data(), m, m);                         // Pᵀ (m × m)
  matmul_rows(w.vt.data(), w.st.data(), w.o.data(), dv, m, m);      // outᵀ = vᵀ Pᵀ (dv × m)
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
  for_each_pair<acc_t>(pairs, m, d, dv, [&](Scratch<acc_t>& w, int64_t pair) {
    load_qkv(w, q, k, v, pair, m, d, dv);
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

// Nested-logit multi-head attention on CPU (CODA / RealFormer; tntkernels/ops/nested_attention.py).
//
// q, k (B, H, T, d); v (B, H, T, dv); prev_logits, noise (B, H, T, T); head_mlp: none or six tensors
// (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)), nn.Linear convention.
//
//   forward:  S = scale q kᵀ (+ prev);  Z = S + MLP(U) (CODA, prev given; U = S with −inf → 0) or Z = S;
//             Z += noise;  P = softmax_rows(Z);  out = P v;  lse = log Σ_j exp(Z_ij)
//   backward: Z recomputed as the forward computed it (accumulation type, noise included: the returned
//             logits may be rounded to fp16 / bf16);  P = exp(Z − lse);  dV = Pᵀ gO;  dP = gO vᵀ;  dZ = gZ + P ⊙ (dP − rowsum(dP ⊙ P));
//             CODA: back through the MLP, dS = dZ + dU (dU = 0 where S = −inf); else dS = dZ;
//             dprev = dS;  dq = scale dS k;  dk = scale dSᵀ q.
//
// at::parallel_for over fixed chunks of sequences b (the chunk size depends on B only, never on the
// thread count); a task handles all heads of its sequences, so the head-MLP is run over the head axis as
// three small matmuls (4H × H)·(H × T²) etc. whose inner loops run over the T² positions. MLP weight
// gradients go to one partial row per chunk (accumulated in a fixed order) and the rows are summed in
// chunk order at the end: results do not depend on the number of threads. Accumulation in float for
// float16 / bfloat16 / float32, double for float64.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "tntkernels/cpu_vec.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/nested_attention.h"

namespace tntkernels {

namespace {

constexpr double kSlope = 0.2;  // LeakyReLU negative slope of the head-MLP

// out (rows × n) = w (rows × k) · x (k × n) + bias (rows), all row-major.
template <typename acc_t>
inline void linear(const acc_t* w, const acc_t* bias, const acc_t* x, acc_t* out, int64_t rows, int64_t k, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* o = out + r * n;
    for (int64_t j = 0; j < n; ++j) o[j] = bias[r];
    for (int64_t c = 0; c < k; ++c) axpy(o, w[r * k + c], x + c * n, n);
  }
}
// out (k × n) = wᵀ · x, w (rows × k), x (rows × n).
template <typename acc_t>
inline void linear_t(const acc_t* w, const acc_t* x, acc_t* out, int64_t rows, int64_t k, int64_t n) {
  for (int64_t c = 0; c < k * n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k; ++c) axpy(out + c * n, w[r * k + c], x + r * n, n);
}
template <typename acc_t>
inline void leaky(acc_t* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] > 0 ? x[j] : x[j] * acc_t(kSlope);
}
// dW (rows × k) += g (rows × n) · xᵀ (x: k × n); db (rows) += rowsum(g).
template <typename acc_t>
inline void weight_grad(const acc_t* g, const acc_t* x, acc_t* dw, acc_t* db, int64_t rows, int64_t k, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < k; ++c) dw[r * k + c] += dot(g + r * n, x + c * n, n);
    acc_t s = 0;
    for (int64_t j = 0; j < n; ++j) s += g[r * n + j];
    db[r] += s;
  }
}

// Per-task scratch for one sequence (all heads); MLP buffers only in the CODA form.
template <typename acc_t>
struct Work {
  std::vector<acc_t> q, kt, k, vt, v, g, s, z, u, a1, a2, d1, d2, dz;
  Work(int64_t H, int64_t T, int64_t d, int64_t dv, bool mlp) {
    const int64_t TT = T * T;
    for (auto* b : {&q, &kt, &k}) b->resize(H * T * d);
    for (auto* b : {&vt, &v, &g}) b->resize(H * T * dv);
    for (auto* b : {&s, &z, &dz}) b->resize(H * TT);
    if (mlp) {
      u.resize(H * TT);
      for (auto* b : {&a1, &a2, &d1, &d2}) b->resize(4 * H * TT);
    }
  }
};

// S (H × T²) = scale q kᵀ (+ prev) for sequence b; also loads q, kᵀ, k.
template <typename scalar_t, typename acc_t>
inline void compute_s(Work<acc_t>& w, const scalar_t* q, const scalar_t* k, const scalar_t* prev, int64_t H,
                      int64_t T, int64_t d, acc_t scale) {
  const int64_t TT = T * T;
  load(q, w.q.data(), H * T * d);
  load(k, w.k.data(), H * T * d);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < T; ++j)
      for (int64_t c = 0; c < d; ++c) w.kt[(h * d + c) * T + j] = w.k[(h * T + j) * d + c];
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < T; ++i) {
      acc_t* si = w.s.data() + h * TT + i * T;
      if (prev) load(prev + h * TT + i * T, si, T);
      else for (int64_t j = 0; j < T; ++j) si[j] = 0;
      for (int64_t c = 0; c < d; ++c) axpy(si, w.q[(h * T + i) * d + c] * scale, w.kt.data() + (h * d + c) * T, T);
    }
  }
}

// U = S with −inf → 0; a1 = leaky(W1 U + b1); a2 = leaky(W2 a1 + b2) — all (· × T²).
template <typename acc_t>
inline void mlp_hidden(Work<acc_t>& w, const std::vector<acc_t>& W, int64_t H, int64_t TT) {
  const int64_t F = 4 * H;
  const acc_t *w1 = W.data(), *b1 = w1 + F * H, *w2 = b1 + F, *b2 = w2 + F * F;
  for (int64_t x = 0; x < H * TT; ++x)
    w.u[x] = w.s[x] == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : w.s[x];
  linear(w1, b1, w.u.data(), w.a1.data(), F, H, TT);
  leaky(w.a1.data(), F * TT);
  linear(w2, b2, w.a1.data(), w.a2.data(), F, F, TT);
  leaky(w.a2.data(), F * TT);
}

// Z (H × T²) = S + head-MLP(S) (CODA) or S, + noise, in the accumulation type, into w.z; after compute_s.
// The forward and the backward both call it, so the backward's P = exp(Z − lse) is the forward's softmax
// exactly, whatever dtype the returned logits were rounded to. Leaves w.u, a1, a2 set for the MLP backward.
template <typename scalar_t, typename acc_t>
inline void compute_z(Work<acc_t>& w, const std::vector<acc_t>& W, bool mlp, const scalar_t* noise, int64_t H,
                      int64_t TT) {
  acc_t* z = w.z.data();
  if (mlp) {
    const int64_t F = 4 * H;
    mlp_hidden(w, W, H, TT);
    const acc_t *w3 = W.data() + F * H + F + F * F + F, *b3 = w3 + H * F;
    linear(w3, b3, w.a2.data(), z, H, F, TT);
    for (int64_t x = 0; x < H * TT; ++x) z[x] += w.s[x];
  } else {
    std::copy(w.s.begin(), w.s.end(), w.z.begin());
  }
  if (noise)
    for (int64_t x = 0; x < H * TT; ++x) z[x] += acc_t(noise[x]);
}

template <typename scalar_t>
void nested_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* prev,
                       const std::vector<at::opmath_type<scalar_t>>& W, bool mlp, const scalar_t* noise, scalar_t* out,
                       scalar_t* logits, at::opmath_type<scalar_t>* lse, int64_t B, int64_t H, int64_t T, int64_t d,
                       int64_t dv, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t TT = T * T;
  const acc_t scale = static_cast<acc_t>(scale_d);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Work<acc_t> w(H, T, d, dv, mlp);
    for (int64_t b = begin; b < end; ++b) {
      compute_s(w, q + b * H * T * d, k + b * H * T * d, prev ? prev + b * H * TT : nullptr, H, T, d, scale);
      compute_z(w, W, mlp, noise ? noise + b * H * TT : nullptr, H, TT);
      acc_t* z = w.z.data();
      scalar_t* lg = logits + b * H * TT;
      for (int64_t x = 0; x < H * TT; ++x) lg[x] = static_cast<scalar_t>(z[x]);
      load(v + b * H * T * dv, w.v.data(), H * T * dv);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < T; ++i) {
          acc_t* zi = z + h * TT + i * T;
          acc_t mx = -std::numeric_limits<acc_t>::infinity();
          for (int64_t j = 0; j < T; ++j) mx = zi[j] > mx ? zi[j] : mx;
          const acc_t shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
          acc_t sum = 0;
          for (int64_t j = 0; j < T; ++j) {
            zi[j] = std::exp(zi[j] - shift);
            sum += zi[j];
          }
          lse[(b * H + h) * T + i] = shift + std::log(sum);
          const acc_t inv = acc_t(1) / sum;
          acc_t* o = w.g.data();  // row buffer (dv)
          for (int64_t c = 0; c < dv; ++c) o[c] = 0;
          for (int64_t j = 0; j < T; ++j) axpy(o, zi[j] * inv, w.v.data() + (h * T + j) * dv, dv);
          scalar_t* ob = out + ((b * H + h) * T + i) * dv;
          for (int64_t c = 0; c < dv; ++c) ob[c] = static_cast<scalar_t>(o[c]);
        }
      }
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
  const int64_t TT = T * T, F = 4 * H, P = static_cast<int64_t>(W.size());
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t *w1 = W.data(), *w2 = w1 + F * H + F, *w3 = w2 + F * F + F;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    Work<acc_t> w(H, T, d, dv, mlp);
    std::vector<acc_t> row(std::max(d, dv));
    for (int64_t ch = cbegin; ch < cend; ++ch) {
      acc_t* part = mlp ? partial + ch * P : nullptr;
      for (int64_t b = ch * chunk; b < std::min(B, (ch + 1) * chunk); ++b) {
        // Z in the accumulation type (as the forward computed it); S, U and the MLP activations stay in w.
        compute_s(w, q + b * H * T * d, k + b * H * T * d, prev ? prev + b * H * TT : nullptr, H, T, d, scale);
        compute_z(w, W, mlp, noise ? noise + b * H * TT : nullptr, H, TT);
        acc_t* p = w.z.data();
        acc_t* dz = w.dz.data();
        load(v + b * H * T * dv, w.v.data(), H * T * dv);
        load(gout + b * H * T * dv, w.g.data(), H * T * dv);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t j = 0; j < T; ++j)
            for (int64_t c = 0; c < dv; ++c) w.vt[(h * dv + c) * T + j] = w.v[(h * T + j) * dv + c];
        // P, dP = gO vᵀ, dZ = gZ + P ⊙ (dP − rowsum(dP ⊙ P)), dV = Pᵀ gO
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t i = 0; i < T; ++i) {
            acc_t* pi = p + h * TT + i * T;
            acc_t* dzi = dz + h * TT + i * T;
            const acc_t l = lse[(b * H + h) * T + i];
            for (int64_t j = 0; j < T; ++j) pi[j] = std::exp(pi[j] - l);
            for (int64_t j = 0; j < T; ++j) dzi[j] = 0;
            const acc_t* gi = w.g.data() + (h * T + i) * dv;
            for (int64_t c = 0; c < dv; ++c) axpy(dzi, gi[c], w.vt.data() + (h * dv + c) * T, T);
            const acc_t delta = dot(pi, dzi, T);
            if (gz) {
              const scalar_t* gzi = gz + (b * H + h) * TT + i * T;
              for (int64_t j = 0; j < T; ++j) dzi[j] = acc_t(gzi[j]) + pi[j] * (dzi[j] - delta);
            } else {
              for (int64_t j = 0; j < T; ++j) dzi[j] = pi[j] * (dzi[j] - delta);
            }
          }
          for (int64_t j = 0; j < T; ++j) {
            for (int64_t c = 0; c < dv; ++c) row[c] = 0;
            for (int64_t i = 0; i < T; ++i) axpy(row.data(), p[h * TT + i * T + j], w.g.data() + (h * T + i) * dv, dv);
            scalar_t* o = dvo + ((b * H + h) * T + j) * dv;
            for (int64_t c = 0; c < dv; ++c) o[c] = static_cast<scalar_t>(row[c]);
          }
        }
        // dS: through the head-MLP (CODA) or dS = dZ. Uses w.s, w.q, w.k, w.u, w.a1, w.a2 from above.
        if (mlp) {
          acc_t *dw1 = part, *db1 = dw1 + F * H, *dw2 = db1 + F, *db2 = dw2 + F * F, *dw3 = db2 + F,
                *db3 = dw3 + H * F;
          weight_grad(dz, w.a2.data(), dw3, db3, H, F, TT);       // dW3 += dZ a2ᵀ
          linear_t(w3, dz, w.d2.data(), H, F, TT);                // da2 = W3ᵀ dZ
          for (int64_t x = 0; x < F * TT; ++x) w.d2[x] *= w.a2[x] > 0 ? acc_t(1) : acc_t(kSlope);
          weight_grad(w.d2.data(), w.a1.data(), dw2, db2, F, F, TT);
          linear_t(w2, w.d2.data(), w.d1.data(), F, F, TT);      // da1 = W2ᵀ dH2
          for (int64_t x = 0; x < F * TT; ++x) w.d1[x] *= w.a1[x] > 0 ? acc_t(1) : acc_t(kSlope);
          weight_grad(w.d1.data(), w.u.data(), dw1, db1, F, H, TT);
          acc_t* du = w.z.data();  // P no longer needed
          linear_t(w1, w.d1.data(), du, F, H, TT);               // dU = W1ᵀ dH1
          for (int64_t x = 0; x < H * TT; ++x)
            if (w.s[x] != -std::numeric_limits<acc_t>::infinity()) dz[x] += du[x];
        }
        if (dprev) {
          scalar_t* o = dprev + b * H * TT;
          for (int64_t x = 0; x < H * TT; ++x) o[x] = static_cast<scalar_t>(dz[x]);
        }
        // dq = scale dS k;  dk = scale dSᵀ q
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t i = 0; i < T; ++i) {
            for (int64_t c = 0; c < d; ++c) row[c] = 0;
            for (int64_t j = 0; j < T; ++j) axpy(row.data(), dz[h * TT + i * T + j], w.k.data() + (h * T + j) * d, d);
            scalar_t* o = dq + ((b * H + h) * T + i) * d;
            for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(row[c] * scale);
          }
          for (int64_t j = 0; j < T; ++j) {
            for (int64_t c = 0; c < d; ++c) row[c] = 0;
            for (int64_t i = 0; i < T; ++i) axpy(row.data(), dz[h * TT + i * T + j], w.q.data() + (h * T + i) * d, d);
            scalar_t* o = dk + ((b * H + h) * T + j) * d;
            for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(row[c] * scale);
          }
        }
      }
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
  // Fixed chunks of sequences (depend on B only): at most 256 partial rows of MLP weight gradients.
  const int64_t chunk = std::max<int64_t>(1, (B + 255) / 256);
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
                                  dq.data_ptr<scalar_t>(),
                                  dk.data_ptr<scalar_t>(), dvt.data_ptr<scalar_t>(),
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

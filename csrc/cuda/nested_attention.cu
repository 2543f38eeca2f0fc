// Nested-logit multi-head attention on CUDA (CODA / RealFormer) for the inner-level sizes:
// T ≤ 64 tokens, H ≤ 16 heads, d, dv ≤ 64; float32 / float16 / bfloat16 with float accumulation.
// Same math and structure as csrc/cpu/nested_attention.cpp.
//
// One block per sequence b on grid axis x (never y/z); when B exceeds the grid cap (which depends on
// the shapes only) a block walks b = blockIdx.x, blockIdx.x + gridDim.x, ... Inside a block, phases
// separated by __syncthreads:
//   forward:  [positions (i, j)] S over heads, head-MLP in registers, Z → slot and logits;
//             [rows (h, i)] softmax, lse, out = P v.
//   backward: [positions] Z recomputed in float as the forward computed it (the returned logits may be
//             rounded to fp16 / bf16); [columns (h, j)] dV = Pᵀ gO, P = exp(Z − lse);
//             [rows (h, i)] dZ = gZ + P ⊙ (dP − rowsum(dP ⊙ P));
//             CODA: [positions] recompute S, MLP activations (kept in the slot), back through the MLP,
//             dS = dZ + dU;  [weight elements] one thread per MLP parameter sums over positions and adds
//             to its block's row of a (grid, P) float buffer, summed with at::sum afterwards;
//             [rows] dq, dprev;  [columns] dk.
// No atomics anywhere: every output element has exactly one writer, so results are deterministic.
// The per-block slot (Z / dZ and the MLP activations) lives in shared memory when it fits, else in a
// global float workspace of one slot per block.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "tntkernels/cuda_utils.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/limits.h"
#include "tntkernels/nested_attention.h"

namespace tntkernels {
namespace {

using limits::nested_attention_cuda::kMaxHeadDim;
using limits::nested_attention_cuda::kMaxHeads;
using limits::nested_attention_cuda::kMaxTokens;

constexpr int kThreads = 256;
constexpr int64_t kMaxMlpWidth = 4 * kMaxHeads;  // F = 4H hidden units of the head-MLP
constexpr float kSlope = 0.2f;
constexpr int64_t kSmemLimit = 96 * 1024;           // bytes of dynamic shared memory we ask for at most
constexpr int64_t kWorkspaceLimit = 256LL << 20;    // bytes of global slot workspace at most
constexpr int64_t kMaxBlocksMlpBwd = 8192;          // rows of the weight-gradient partial buffer

__device__ __forceinline__ float leaky(float x) { return x > 0.f ? x : x * kSlope; }

template <typename scalar_t>
__device__ __forceinline__ float dot_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int n) {
  float s = 0.f;
  for (int c = 0; c < n; ++c) s += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  return s;
}

// S[h] = scale q_{b,h,i}·k_{b,h,j} (+ prev_{b,h,i,j}) for every head h.
template <typename scalar_t>
__device__ __forceinline__ void scores_at(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                          const scalar_t* __restrict__ prev, int64_t b, int H, int T, int d, int i,
                                          int j, float scale, float (&s)[kMaxHeads]) {
  const int64_t TT = static_cast<int64_t>(T) * T;
  for (int h = 0; h < H; ++h) {
    const int64_t bh = b * H + h;
    float x = dot_rows(q + (bh * T + i) * d, k + (bh * T + j) * d, d) * scale;
    if (prev != nullptr) x += static_cast<float>(prev[bh * TT + static_cast<int64_t>(i) * T + j]);
    s[h] = x;
  }
}

// Hidden activations of the head-MLP at one position: u = S (−inf → 0), a1, a2.
__device__ __forceinline__ void mlp_hidden(const float* __restrict__ W, int H, const float (&s)[kMaxHeads],
                                           float (&u)[kMaxHeads], float (&a1)[kMaxMlpWidth],
                                           float (&a2)[kMaxMlpWidth]) {
  const int F = 4 * H;
  const float *w1 = W, *b1 = w1 + F * H, *w2 = b1 + F, *b2 = w2 + F * F;
  for (int h = 0; h < H; ++h) u[h] = s[h] == -INFINITY ? 0.f : s[h];
  for (int r = 0; r < F; ++r) {
    float x = b1[r];
    for (int h = 0; h < H; ++h) x += w1[r * H + h] * u[h];
    a1[r] = leaky(x);
  }
  for (int r = 0; r < F; ++r) {
    float x = b2[r];
    for (int c = 0; c < F; ++c) x += w2[r * F + c] * a1[c];
    a2[r] = leaky(x);
  }
}

// Z[h] at position (i, j) of sequence b for every head, in float: S, + head-MLP(S) when P > 0, + noise.
// The forward and the backward both call it, so the backward's P = exp(Z − lse) is the forward's softmax
// exactly, whatever dtype the returned logits were rounded to.
template <typename scalar_t>
__device__ __forceinline__ void z_at(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                     const scalar_t* __restrict__ prev, const float* __restrict__ W,
                                     const scalar_t* __restrict__ noise, int64_t b, int H, int T, int d, int i, int j,
                                     int P, float scale, float (&s)[kMaxHeads]) {
  scores_at(q, k, prev, b, H, T, d, i, j, scale, s);
  if (P > 0) {
    const int F = 4 * H;
    const float* w3 = W + F * H + F + F * F + F;
    const float* b3 = w3 + H * F;
    float u[kMaxHeads], a1[kMaxMlpWidth], a2[kMaxMlpWidth];
    mlp_hidden(W, H, s, u, a1, a2);
    for (int h = 0; h < H; ++h) {
      float y = b3[h];
      for (int r = 0; r < F; ++r) y += w3[h * F + r] * a2[r];
      s[h] += y;
    }
  }
  if (noise != nullptr) {
    const int64_t TT = static_cast<int64_t>(T) * T, pos = static_cast<int64_t>(i) * T + j;
    for (int h = 0; h < H; ++h) s[h] += static_cast<float>(noise[(b * H + h) * TT + pos]);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nested_fwd_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ prev, const float* __restrict__ Wg, const scalar_t* __restrict__ noise,
    scalar_t* __restrict__ out, scalar_t* __restrict__ logits, float* __restrict__ lse, float* __restrict__ ws,
    bool slot_in_smem, int64_t B, int H, int T, int d, int dv, int P, float scale) {
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int64_t TT = static_cast<int64_t>(T) * T;
  const int64_t slot_size = H * TT;
  float* W = smem;  // P floats (0 without the MLP)
  for (int e = tid; e < P; e += blockDim.x) W[e] = Wg[e];
  float* z = slot_in_smem ? smem + P : ws + static_cast<int64_t>(blockIdx.x) * slot_size;
  __syncthreads();
  TNT_BLOCK_STRIDE_LOOP(b, B) {
    // Positions: Z[h, i, j] over every head.
    for (int pos = tid; pos < TT; pos += blockDim.x) {
      const int i = pos / T, j = pos % T;
      float s[kMaxHeads];
      z_at(q, k, prev, W, noise, b, H, T, d, i, j, P, scale, s);
      for (int h = 0; h < H; ++h) {
        z[h * TT + pos] = s[h];
        logits[(b * H + h) * TT + pos] = static_cast<scalar_t>(s[h]);
      }
    }
    __syncthreads();
    // Rows (h, i): softmax, lse, out = P v.
    for (int r = tid; r < H * T; r += blockDim.x) {
      const int h = r / T, i = r % T;
      float* zi = z + h * TT + static_cast<int64_t>(i) * T;
      float mx = -INFINITY;
      for (int j = 0; j < T; ++j) mx = fmaxf(mx, zi[j]);
      const float shift = mx == -INFINITY ? 0.f : mx;
      float sum = 0.f;
      for (int j = 0; j < T; ++j) {
        const float p = expf(zi[j] - shift);
        zi[j] = p;
        sum += p;
      }
      const int64_t row = (b * H + h) * T + i;
      lse[row] = shift + logf(sum);
      const float inv = 1.f / sum;
      const scalar_t* vb = v + (b * H + h) * T * dv;
      for (int c = 0; c < dv; ++c) {
        float acc = 0.f;
        for (int j = 0; j < T; ++j) acc += zi[j] * static_cast<float>(vb[j * dv + c]);
        out[row * dv + c] = static_cast<scalar_t>(acc * inv);
      }
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nested_bwd_kernel(
    const scalar_t* __restrict__ gout, const scalar_t* __restrict__ gz, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, const scalar_t* __restrict__ prev,
    const float* __restrict__ Wg, const scalar_t* __restrict__ noise, const float* __restrict__ lse,
    scalar_t* __restrict__ dq, scalar_t* __restrict__ dk, scalar_t* __restrict__ dvo, scalar_t* __restrict__ dprev,
    float* __restrict__ partial, float* __restrict__ ws, bool slot_in_smem, int64_t slot_size, int64_t B, int H,
    int T, int d, int dv, int P, float scale) {
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int64_t TT = static_cast<int64_t>(T) * T;
  const int F = 4 * H;
  float* W = smem;
  for (int e = tid; e < P; e += blockDim.x) W[e] = Wg[e];
  float* slot = slot_in_smem ? smem + P : ws + static_cast<int64_t>(blockIdx.x) * slot_size;
  float* dz = slot;                 // H × T²
  float* dy = dz + H * TT;          // H × T²  (dZ before the MLP's contribution)
  float* us = dy + H * TT;          // H × T²
  float* a1s = us + H * TT;         // F × T²
  float* a2s = a1s + F * TT;        // F × T²
  float* d1s = a2s + F * TT;        // F × T²
  float* d2s = d1s + F * TT;        // F × T²
  const float *w1 = W, *w2 = W + F * H + F, *w3 = w2 + F * F + F;
  float* part = partial != nullptr ? partial + static_cast<int64_t>(blockIdx.x) * P : nullptr;
  __syncthreads();
  TNT_BLOCK_STRIDE_LOOP(b, B) {
    // Positions: Z in float as the forward computed it (into the dZ slot).
    for (int pos = tid; pos < TT; pos += blockDim.x) {
      float s[kMaxHeads];
      z_at(q, k, prev, W, noise, b, H, T, d, pos / T, pos % T, P, scale, s);
      for (int h = 0; h < H; ++h) dz[h * TT + pos] = s[h];
    }
    __syncthreads();
    // Columns (h, j): dV = Pᵀ gO, P = exp(Z − lse).
    for (int r = tid; r < H * T; r += blockDim.x) {
      const int h = r / T, j = r % T;
      const int64_t bh = b * H + h;
      float acc[kMaxHeadDim];
      for (int c = 0; c < dv; ++c) acc[c] = 0.f;
      for (int i = 0; i < T; ++i) {
        const float p = expf(dz[h * TT + static_cast<int64_t>(i) * T + j] - lse[bh * T + i]);
        const scalar_t* gi = gout + (bh * T + i) * dv;
        for (int c = 0; c < dv; ++c) acc[c] += p * static_cast<float>(gi[c]);
      }
      for (int c = 0; c < dv; ++c) dvo[(bh * T + j) * dv + c] = static_cast<scalar_t>(acc[c]);
    }
    __syncthreads();
    // Rows (h, i): dZ = gZ + P ⊙ (dP − rowsum(P ⊙ dP)), in place of Z (P first, then dZ).
    for (int r = tid; r < H * T; r += blockDim.x) {
      const int h = r / T, i = r % T;
      const int64_t bh = b * H + h, row = bh * T + i;
      const float l = lse[row];
      const scalar_t* gi = gout + row * dv;
      const scalar_t* vb = v + bh * T * dv;
      float* dzi = dz + h * TT + static_cast<int64_t>(i) * T;
      float delta = 0.f;
      for (int j = 0; j < T; ++j) {
        const float p = expf(dzi[j] - l);
        dzi[j] = p;
        delta += p * dot_rows(gi, vb + j * dv, dv);
      }
      for (int j = 0; j < T; ++j) {
        const float g = gz != nullptr ? static_cast<float>(gz[bh * TT + static_cast<int64_t>(i) * T + j]) : 0.f;
        dzi[j] = g + dzi[j] * (dot_rows(gi, vb + j * dv, dv) - delta);
      }
    }
    __syncthreads();
    if (P > 0) {
      // Positions: back through the head-MLP.
      for (int pos = tid; pos < TT; pos += blockDim.x) {
        const int i = pos / T, j = pos % T;
        float s[kMaxHeads], u[kMaxHeads];
        float a1[kMaxMlpWidth], a2[kMaxMlpWidth], g1[kMaxMlpWidth], g2[kMaxMlpWidth];
        scores_at(q, k, prev, b, H, T, d, i, j, scale, s);
        mlp_hidden(W, H, s, u, a1, a2);
        for (int h = 0; h < H; ++h) {
          us[h * TT + pos] = u[h];
          dy[h * TT + pos] = dz[h * TT + pos];
        }
        for (int r = 0; r < F; ++r) {
          a1s[r * TT + pos] = a1[r];
          a2s[r * TT + pos] = a2[r];
          float x = 0.f;
          for (int h = 0; h < H; ++h) x += w3[h * F + r] * dz[h * TT + pos];
          g2[r] = x * (a2[r] > 0.f ? 1.f : kSlope);
          d2s[r * TT + pos] = g2[r];
        }
        for (int c = 0; c < F; ++c) {
          float x = 0.f;
          for (int r = 0; r < F; ++r) x += w2[r * F + c] * g2[r];
          g1[c] = x * (a1[c] > 0.f ? 1.f : kSlope);
          d1s[c * TT + pos] = g1[c];
        }
        for (int h = 0; h < H; ++h) {
          float du = 0.f;
          for (int r = 0; r < F; ++r) du += w1[r * H + h] * g1[r];
          if (s[h] != -INFINITY) dz[h * TT + pos] += du;
        }
      }
      __syncthreads();
      // Weight elements: sums over the positions of this sequence, added to this block's row.
      const int o_b1 = F * H, o_w2 = o_b1 + F, o_b2 = o_w2 + F * F, o_w3 = o_b2 + F, o_b3 = o_w3 + H * F;
      for (int e = tid; e < P; e += blockDim.x) {
        const float *x = nullptr, *y = nullptr;
        if (e < o_b1) { x = d1s + (e / H) * TT; y = us + (e % H) * TT; }
        else if (e < o_w2) { x = d1s + (e - o_b1) * TT; }
        else if (e < o_b2) { x = d2s + ((e - o_w2) / F) * TT; y = a1s + ((e - o_w2) % F) * TT; }
        else if (e < o_w3) { x = d2s + (e - o_b2) * TT; }
        else if (e < o_b3) { x = dy + ((e - o_w3) / F) * TT; y = a2s + ((e - o_w3) % F) * TT; }
        else { x = dy + (e - o_b3) * TT; }
        float acc = 0.f;
        if (y != nullptr) for (int64_t p = 0; p < TT; ++p) acc += x[p] * y[p];
        else for (int64_t p = 0; p < TT; ++p) acc += x[p];
        part[e] += acc;
      }
    }
    // Rows (h, i): dq and dprev.  Columns (h, j): dk.  (dz is final here.)
    for (int r = tid; r < H * T; r += blockDim.x) {
      const int h = r / T, i = r % T;
      const int64_t bh = b * H + h;
      const float* dzi = dz + h * TT + static_cast<int64_t>(i) * T;
      const scalar_t* kb = k + bh * T * d;
      for (int c = 0; c < d; ++c) {
        float acc = 0.f;
        for (int j = 0; j < T; ++j) acc += dzi[j] * static_cast<float>(kb[j * d + c]);
        dq[(bh * T + i) * d + c] = static_cast<scalar_t>(acc * scale);
      }
      if (dprev != nullptr)
        for (int j = 0; j < T; ++j) dprev[bh * TT + static_cast<int64_t>(i) * T + j] = static_cast<scalar_t>(dzi[j]);
    }
    for (int r = tid; r < H * T; r += blockDim.x) {
      const int h = r / T, j = r % T;
      const int64_t bh = b * H + h;
      const scalar_t* qb = q + bh * T * d;
      for (int c = 0; c < d; ++c) {
        float acc = 0.f;
        for (int i = 0; i < T; ++i) acc += dz[h * TT + static_cast<int64_t>(i) * T + j] * static_cast<float>(qb[i * d + c]);
        dk[(bh * T + j) * d + c] = static_cast<scalar_t>(acc * scale);
      }
    }
    __syncthreads();
  }
}

void check_cuda_range(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "nested_attention (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() != at::kDouble,
              "nested_attention (CUDA): supports float32, float16 and bfloat16, got float64");
  const int64_t H = q.size(1), T = q.size(2), d = q.size(3), dv = v.size(3);
  TORCH_CHECK(T <= kMaxTokens && H <= kMaxHeads && d <= kMaxHeadDim && dv <= kMaxHeadDim,
              "nested_attention (CUDA): supports T <= ", kMaxTokens, " tokens, H <= ", kMaxHeads,
              " heads and head dims d, dv <= ", kMaxHeadDim, "; got T=", T, ", H=", H, ", d=", d, ", dv=", dv);
}

at::Tensor flat_weights(at::TensorList head_mlp, const at::Tensor& q) {
  std::vector<at::Tensor> parts;
  for (const auto& w : head_mlp) parts.push_back(w.reshape({-1}).to(at::kFloat));
  return parts.empty() ? at::empty({0}, q.options().dtype(at::kFloat)) : at::cat(parts).contiguous();
}

// Grid size and slot placement for a per-block slot of `slot_floats` floats (depends on shapes only).
struct Launch {
  int64_t grid;
  bool smem_slot;
  int64_t smem_bytes;
};
Launch plan(int64_t B, int64_t P, int64_t slot_floats, int64_t max_blocks = cuda::kMaxGridBlocks) {
  Launch l;
  const int64_t with_slot = (P + slot_floats) * static_cast<int64_t>(sizeof(float));
  l.smem_slot = with_slot <= kSmemLimit;
  l.smem_bytes = l.smem_slot ? with_slot : P * static_cast<int64_t>(sizeof(float));
  int64_t cap = max_blocks;
  if (!l.smem_slot)
    cap = std::min(cap, std::max<int64_t>(1, kWorkspaceLimit / (slot_floats * static_cast<int64_t>(sizeof(float)))));
  l.grid = cuda::capped_grid(B, 1, cap);
  return l;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nested_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& prev_in,
    at::TensorList head_mlp, const c10::optional<at::Tensor>& noise_in, double scale) {
  check_nested_attention_inputs(q_in, k_in, v_in, prev_in, head_mlp, noise_in);
  check_cuda_range(q_in, v_in);
  const cuda::DeviceScope scope(q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor prev = prev_in.has_value() ? prev_in->contiguous() : at::Tensor();
  const at::Tensor noise = noise_in.has_value() ? noise_in->contiguous() : at::Tensor();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), dv = v.size(3);
  const bool mlp = prev.defined() && head_mlp.size() == 6;
  at::Tensor out = at::empty({B, H, T, dv}, q.options());
  at::Tensor logits = at::empty({B, H, T, T}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (B * H * T == 0) return {out, logits, lse};
  const at::Tensor W = mlp ? flat_weights(head_mlp, q) : at::empty({0}, q.options().dtype(at::kFloat));
  const int64_t P = W.numel();
  const Launch l = plan(B, P, H * T * T);
  at::Tensor ws = l.smem_slot ? at::empty({0}, q.options().dtype(at::kFloat))
                              : at::empty({l.grid * H * T * T}, q.options().dtype(at::kFloat));
  TNT_DISPATCH_CUDA_TYPES(q.scalar_type(), "nested_attention_cuda", [&] {
    const auto kernel = nested_fwd_kernel<scalar_t>;
    cuda::allow_dynamic_smem(kernel, l.smem_bytes);
    cuda::launch(kernel, static_cast<unsigned>(l.grid), kThreads, l.smem_bytes, scope.stream(),
                 q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                 prev.defined() ? prev.data_ptr<scalar_t>() : nullptr, W.data_ptr<float>(),
                 noise.defined() ? noise.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                 logits.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                 l.smem_slot ? nullptr : ws.data_ptr<float>(), l.smem_slot, B, static_cast<int>(H),
                 static_cast<int>(T), static_cast<int>(d), static_cast<int>(dv), static_cast<int>(P),
                 static_cast<float>(scale));
  });
  return {out, logits, lse};
}

std::vector<at::Tensor> nested_attention_backward_cuda(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_logits_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& prev_in, at::TensorList head_mlp,
    const c10::optional<at::Tensor>& noise_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_nested_attention_backward_inputs(grad_out_in, grad_logits_in, q_in, k_in, v_in, prev_in, head_mlp, noise_in,
                                         out_in, lse_in);
  check_cuda_range(q_in, v_in);
  const cuda::DeviceScope scope(q_in);
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
  const at::Tensor W = mlp ? flat_weights(head_mlp, q) : at::empty({0}, q.options().dtype(at::kFloat));
  const int64_t P = W.numel(), TT = T * T;
  const int64_t slot = mlp ? (3 * H + 4 * 4 * H) * TT : H * TT;
  const Launch l = plan(B, P, slot, mlp ? kMaxBlocksMlpBwd : cuda::kMaxGridBlocks);
  at::Tensor partial = at::zeros({mlp ? l.grid : 0, P}, q.options().dtype(at::kFloat));
  if (B * H * T > 0) {
    at::Tensor ws = l.smem_slot ? at::empty({0}, q.options().dtype(at::kFloat))
                                : at::empty({l.grid * slot}, q.options().dtype(at::kFloat));
    TNT_DISPATCH_CUDA_TYPES(q.scalar_type(), "nested_attention_backward_cuda", [&] {
      const auto kernel = nested_bwd_kernel<scalar_t>;
      cuda::allow_dynamic_smem(kernel, l.smem_bytes);
      cuda::launch(kernel, static_cast<unsigned>(l.grid), kThreads, l.smem_bytes, scope.stream(),
                   g.data_ptr<scalar_t>(), gz.defined() ? gz.data_ptr<scalar_t>() : nullptr, q.data_ptr<scalar_t>(),
                   k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                   prev.defined() ? prev.data_ptr<scalar_t>() : nullptr, W.data_ptr<float>(),
                   noise.defined() ? noise.data_ptr<scalar_t>() : nullptr, lse.data_ptr<float>(),
                   dq.data_ptr<scalar_t>(),
                   dk.data_ptr<scalar_t>(), dvt.data_ptr<scalar_t>(),
                   prev.defined() ? dprev.data_ptr<scalar_t>() : nullptr, mlp ? partial.data_ptr<float>() : nullptr,
                   l.smem_slot ? nullptr : ws.data_ptr<float>(), l.smem_slot, slot, B, static_cast<int>(H),
                   static_cast<int>(T), static_cast<int>(d), static_cast<int>(dv), static_cast<int>(P),
                   static_cast<float>(scale));
    });
  }
  if (mlp) {
    const at::Tensor total = at::sum(partial, 0);  // deterministic reduction over the block rows
    append_head_mlp_grads(result, total, head_mlp, q.scalar_type());
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CUDA, m) {
  m.impl("nested_attention", &nested_attention_cuda);
  m.impl("nested_attention_backward", &nested_attention_backward_cuda);
}

}  // namespace tntkernels

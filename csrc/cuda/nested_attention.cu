// Nested-logit multi-head attention on CUDA (CODA / RealFormer) for the inner-level sizes:
// T ≤ 64 tokens, H ≤ 16 heads, d, dv ≤ 64; float32 / float16 / bfloat16 with float accumulation.
// Same math and structure as csrc/cpu/nested_attention.cpp.
//
// Forward: one block per sequence b on grid axis x (never y/z); when B exceeds the grid cap (which
// depends on the shapes only) a block walks b = blockIdx.x, blockIdx.x + gridDim.x, ...
// Backward: the sequences are cut into `rows` chunks of `seq_per_row` consecutive sequences (1 without the
// head-MLP; with it at most kMaxPartialRows chunks and kPartialBytes of partial buffer; both depend on B
// and P only); a block walks the chunks r = blockIdx.x, + gridDim.x, ... and the sequences of a chunk in
// order. With the head-MLP, chunk r sums its weight gradients into row r of a (rows, P) float buffer
// (at::empty: every row is written), summed with at::sum afterwards: the chunks depend on B and P only, so
// the weight gradients are deterministic on a given GPU and independent of our grid. (at::sum's own
// reduction order may depend on the GPU model, e.g. its multiprocessor count, so two different GPUs
// may differ in the last bits.)
// Inside a block, phases separated by __syncthreads:
//   forward:  [positions (i, j)] S over heads, head-MLP in registers, Z → slot and logits;
//             [rows (h, i)] softmax, lse, out = P v.
//   backward: [positions] Z recomputed in float as the forward computed it (the returned logits may be
//             rounded to fp16 / bf16); CODA: S, U and the MLP activations A1, A2 kept in the slot;
//             [rows (h, i)] P = exp(Z − lse) in place;  [columns (h, j)] dV = Pᵀ gO;
//             [rows (h, i)] dZ = gZ + P ⊙ (dP − rowsum(P ⊙ dP)) in place;
//             CODA: [positions] back through the MLP from the kept activations, dS = dZ + dU;
//             [weight elements] one thread per MLP parameter sums over the positions of the sequence;
//             [rows] dq, dprev;  [columns] dk.
// No atomics anywhere: every output element has exactly one writer, so results are deterministic.
//
// The head count is a template parameter kH ∈ {4, 8, 16} (H ≤ kH, loops over heads / hidden units fully
// unrolled and predicated on h < H, c < 4H) so that the per-thread head vectors live in registers: no
// kernel has a stack frame. Only loops that index such a vector are unrolled.
//
// Shared memory (dynamic, floats; the slot moves to a global workspace of one slot per block when it does
// not fit kSmemLimit, same layout; the host picks RS and S, see plan()):
//   [W: P weights, padded to a multiple of 32]
//   [slot:  Z: H × T rows of RS floats (head h, query row i at (h·T + i)·RS, key j at + j), padded to 32;
//           backward CODA only, "feature rows" of S ≥ max(T², 32) floats, position p = i·T + j at p:
//           dy (H rows: S of phase 1, then dZ before the MLP's dU), us (H: U), a1s, a2s (4H each: A1, A2),
//           d1s, d2s (4H each: the MLP's pre-activation gradients), ones (1 row of 1.0: the bias sums).
//           Pad positions [T², S) hold 0 (ones row: 1), written once per block, so they add exact zeros.]
// Bank conflicts (32 banks of 4 bytes; a warp is 32 consecutive thread indices). The preferred layout
// (RS = z_row_stride(T), S = roundup(T², 32)):
//   * RS is the smallest odd RS ≥ T with T·(RS − 1) ≡ 0 (mod 32) (T 16 → 17; odd T ≤ 31 → 33, 35 / 49
//     → 65). Rows phases (thread ↔ row r = h·T + i, same j): address r·RS + j, and r ↦ r·RS is a
//     bijection mod 32 (RS odd), so 32 consecutive r hit 32 banks. Columns phases (thread ↔ r = h·T + j,
//     same i): address h·T·RS + i·RS + j ≡ r + i·RS (mod 32) since T·RS ≡ T: 32 banks again.
//   * Feature rows start at multiples of 32 floats (W and Z padded, S ≡ 0 mod 32). Positions phases
//     (thread ↔ p) read / write row·S + p: consecutive. The weight-gradient phase (thread ↔ weight
//     element e, any two feature rows) has lane l read position (t + l) mod S at step t: bank
//     (t + l) mod 32, distinct for the 32 lanes whatever rows they read.
//   * W is read at warp-uniform indices (broadcast).
//   (Checked for every T ≤ 64, H ≤ 16.) The one access pattern not conflict-free: the positions phases'
//   H reads / writes of Z per position (address i·RS + j: 2-way for T 16, at most 5-way for a few odd T),
//   next to the d-long q·k dots from global memory and ~40·H² MLP FMAs per position.
// The padding enlarges the slot (RS up to T + 32, S up to T² + 31), so when it does not fit, plan() retries with
// the compact stride RS = T | 1 (still odd: rows phases conflict-free; columns phases at most 3-way,
// positions phases at most 2-way), then also with S = max(T², 32) (positions phases still consecutive;
// the weight-gradient phase's rows no longer start at bank 0, so it may conflict), and only then moves
// the slot to the global workspace. S never goes below 32: the weight phase starts lane l at p = l.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAMacros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
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
constexpr float kSlope = 0.2f;
constexpr int64_t kSmemLimit = 96 * 1024;         // bytes of dynamic shared memory we ask for at most
constexpr int64_t kWorkspaceLimit = 256LL << 20;  // bytes of global slot workspace at most
constexpr int64_t kPartialBytes = 32LL << 20;     // bytes of the weight-gradient partial buffer at most
constexpr int64_t kMaxPartialRows = 2048;         // ... and rows (chunks of sequences) at most
static_assert(kMaxHeads <= 16, "head buckets below go up to 16");
static_assert(kThreads % 32 == 0, "lane = thread index mod 32 is the same for e = tid + n·kThreads");

__host__ __device__ constexpr int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }

// Row stride of the T × T logit matrices in the slot: the smallest odd RS ≥ T with T·(RS − 1) ≡ 0 mod 32
// (see the bank-conflict note at the top). RS ≡ 1 mod 32 always qualifies, so RS ≤ T + 32.
constexpr int z_row_stride(int T) {
  int rs = T;
  while (!((rs & 1) && (T * (rs - 1)) % 32 == 0)) ++rs;
  return rs;
}
static_assert(z_row_stride(16) == 17 && z_row_stride(64) == 65 && z_row_stride(33) == 33 && z_row_stride(4) == 9 &&
              z_row_stride(1) == 1 && z_row_stride(3) == 33, "z_row_stride");

// Floats of a slot with Z row stride RS (forward: Z; backward: Z and, with the MLP, the 2H + 4·4H
// feature rows and the ones row, of stride S). The host picks RS and S (slot_layout below) and passes
// both, and the slot size computed from them, to the kernels, which derive every offset from RS and S.
int64_t slot_floats(int64_t H, int64_t T, int64_t RS, int64_t S, bool feature_rows) {
  return round32(H * T * RS) + (feature_rows ? (2 * H + 4 * (4 * H) + 1) * S : 0);
}

__device__ __forceinline__ float leaky(float x) { return x > 0.f ? x : x * kSlope; }

template <typename scalar_t>
__device__ __forceinline__ float dot_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int n) {
  float s = 0.f;
  for (int c = 0; c < n; ++c) s += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  return s;
}

// Z[h] (h < H; 0 for H ≤ h < kH) at position (i, j) of sequence b, in float: S = scale q·k (+ prev), + the
// head-MLP of U = S (−inf → 0) when P > 0, + noise. The forward and the backward both call it, so the
// backward's P = exp(Z − lse) is the forward's softmax exactly, whatever dtype the returned logits were
// rounded to. kKeep (backward): also stores S, U, A1, A2 at position `pos` of the feature rows `feat`
// (dy, us, a1s, a2s; stride S) when P > 0. The MLP keeps A1 (4kH) and the output (kH) in registers and
// streams A2 one hidden unit at a time.
template <typename scalar_t, int kH, bool kKeep>
__device__ __forceinline__ void z_at(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                     const scalar_t* __restrict__ prev, const float* __restrict__ W,
                                     const scalar_t* __restrict__ noise, int64_t b, int H, int T, int d, int i, int j,
                                     int P, float scale, float* __restrict__ feat, int S, float (&s)[kH]) {
  constexpr int kF = 4 * kH;
  const int64_t TT = static_cast<int64_t>(T) * T, pos = static_cast<int64_t>(i) * T + j;
#pragma unroll
  for (int h = 0; h < kH; ++h) {
    s[h] = 0.f;
    if (h < H) {
      const int64_t bh = b * H + h;
      float x = dot_rows(q + (bh * T + i) * d, k + (bh * T + j) * d, d) * scale;
      if (prev != nullptr) x += static_cast<float>(prev[bh * TT + pos]);
      s[h] = x;
    }
  }
  if (P > 0) {
    const int F = 4 * H;
    const float *w1 = W, *b1 = w1 + F * H, *w2 = b1 + F, *b2 = w2 + F * F, *w3 = b2 + F, *b3 = w3 + H * F;
    float u[kH];
#pragma unroll
    for (int h = 0; h < kH; ++h) {
      u[h] = (h < H && s[h] != -INFINITY) ? s[h] : 0.f;
      if constexpr (kKeep) {
        if (h < H) {
          feat[h * S + pos] = s[h];            // dy row h
          feat[(H + h) * S + pos] = u[h];      // us row h
        }
      }
    }
    float a1[kF];
#pragma unroll
    for (int c = 0; c < kF; ++c) {
      a1[c] = 0.f;
      if (c < F) {
        float x = b1[c];
#pragma unroll
        for (int h = 0; h < kH; ++h)
          if (h < H) x += w1[c * H + h] * u[h];
        a1[c] = leaky(x);
        if constexpr (kKeep) feat[(2 * H + c) * S + pos] = a1[c];  // a1s row c
      }
    }
    float y[kH];
#pragma unroll
    for (int h = 0; h < kH; ++h) y[h] = h < H ? b3[h] : 0.f;
    for (int r = 0; r < F; ++r) {
      float x = b2[r];
#pragma unroll
      for (int c = 0; c < kF; ++c)
        if (c < F) x += w2[r * F + c] * a1[c];
      const float a2 = leaky(x);
      if constexpr (kKeep) feat[(2 * H + F + r) * S + pos] = a2;  // a2s row r
#pragma unroll
      for (int h = 0; h < kH; ++h)
        if (h < H) y[h] += w3[h * F + r] * a2;
    }
#pragma unroll
    for (int h = 0; h < kH; ++h)
      if (h < H) s[h] += y[h];
  }
  if (noise != nullptr) {
#pragma unroll
    for (int h = 0; h < kH; ++h)
      if (h < H) s[h] += static_cast<float>(noise[(b * H + h) * TT + pos]);
  }
}

// minBlocksPerSM: ptxas's register choice (sm_90) is heuristic; these bounds give no stack frame for every
// bucket (without them kH 8 picked 64 registers and spilled) and keep kH 4 (TNT) at 64 registers, 4 blocks
// of 256 threads per SM as before the template.
template <typename scalar_t, int kH>
__global__ void __launch_bounds__(kThreads, kH == 4 ? 4 : (kH == 8 ? 2 : 1)) nested_fwd_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ prev, const float* __restrict__ Wg, const scalar_t* __restrict__ noise,
    scalar_t* __restrict__ out, scalar_t* __restrict__ logits, float* __restrict__ lse, float* __restrict__ ws,
    bool slot_in_smem, int64_t slot_size, int64_t B, int H, int T, int RS, int d, int dv, int P, float scale) {
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int64_t TT = static_cast<int64_t>(T) * T;
  const int HS = T * RS;  // head stride of Z
  float* W = smem;        // P floats (0 without the MLP), padded to 32
  for (int e = tid; e < P; e += blockDim.x) W[e] = Wg[e];
  float* z = slot_in_smem ? smem + round32(P) : ws + static_cast<int64_t>(blockIdx.x) * slot_size;
  __syncthreads();
  TNT_BLOCK_STRIDE_LOOP(b, B) {
    // Positions: Z[h, i, j] over every head.
    for (int pos = tid; pos < TT; pos += blockDim.x) {
      const int i = pos / T, j = pos % T;
      float s[kH];
      z_at<scalar_t, kH, false>(q, k, prev, W, noise, b, H, T, d, i, j, P, scale, nullptr, 0, s);
#pragma unroll
      for (int h = 0; h < kH; ++h)
        if (h < H) {
          z[h * HS + i * RS + j] = s[h];
          logits[(b * H + h) * TT + pos] = static_cast<scalar_t>(s[h]);
        }
    }
    __syncthreads();
    // Rows (h, i): softmax, lse, out = P v.
    for (int r = tid; r < H * T; r += blockDim.x) {
      const int h = r / T, i = r % T;
      float* zi = z + r * RS;
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

// kH 8 / 16 need more than 128 registers (the MLP gradient keeps 4kH partial sums): 1 block per SM.
template <typename scalar_t, int kH>
__global__ void __launch_bounds__(kThreads, kH <= 4 ? 2 : 1) nested_bwd_kernel(
    const scalar_t* __restrict__ gout, const scalar_t* __restrict__ gz, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v, const scalar_t* __restrict__ prev,
    const float* __restrict__ Wg, const scalar_t* __restrict__ noise, const float* __restrict__ lse,
    scalar_t* __restrict__ dq, scalar_t* __restrict__ dk, scalar_t* __restrict__ dvo, scalar_t* __restrict__ dprev,
    float* __restrict__ partial, float* __restrict__ ws, bool slot_in_smem, int64_t slot_size, int64_t B,
    int64_t seq_per_row, int64_t rows, int H, int T, int RS, int S, int d, int dv, int P, float scale) {
  constexpr int kF = 4 * kH;
  extern __shared__ float smem[];
  const int tid = threadIdx.x;
  const int TT = T * T;
  const int HS = T * RS;  // head stride of Z / dZ
  const int F = 4 * H;
  float* W = smem;
  for (int e = tid; e < P; e += blockDim.x) W[e] = Wg[e];
  float* slot = slot_in_smem ? smem + round32(P) : ws + static_cast<int64_t>(blockIdx.x) * slot_size;
  float* dz = slot;  // H × T rows of RS: Z, then P, then dZ (dS after the MLP)
  // Feature rows (CODA only, stride S) and the MLP weights: the slot and W hold them only when P > 0, so
  // the pointers are formed only then (never past the end of the slot or of W).
  float *dys = nullptr, *us = nullptr, *a1s = nullptr, *a2s = nullptr, *d1s = nullptr, *d2s = nullptr,
        *ones = nullptr;
  const float *w1 = nullptr, *w2 = nullptr, *w3 = nullptr;
  const int nfeat = 2 * H + 4 * F;  // feature rows before `ones`
  if (P > 0) {
    dys = dz + round32(H * HS);  // H: S of phase 1, then dZ before dU
    us = dys + H * S;            // H: U
    a1s = us + H * S;            // F: A1
    a2s = a1s + F * S;           // F: A2
    d1s = a2s + F * S;           // F: gradient at A1's pre-activation
    d2s = d1s + F * S;           // F: gradient at A2's pre-activation
    ones = d2s + F * S;          // 1 row of 1.0
    w1 = W;
    w2 = W + F * H + F;
    w3 = w2 + F * F + F;
    // Pads [T², S) of the feature rows: 0 (never written again); the ones row: 1 everywhere.
    for (int e = tid; e < (nfeat + 1) * S; e += blockDim.x) {
      const int row = e / S, p = e % S;
      if (row == nfeat) dys[e] = 1.f;
      else if (p >= TT) dys[e] = 0.f;
    }
  }
  __syncthreads();
  for (int64_t chunk = blockIdx.x; chunk < rows; chunk += gridDim.x) {
    const int64_t b_first = chunk * seq_per_row, b_end = std::min<int64_t>(B, b_first + seq_per_row);
    float* part = partial != nullptr ? partial + chunk * P : nullptr;
    for (int64_t b = b_first; b < b_end; ++b) {
      // Positions: Z in float as the forward computed it (CODA: S, U, A1, A2 into the feature rows).
      for (int pos = tid; pos < TT; pos += blockDim.x) {
        const int i = pos / T, j = pos % T;
        float s[kH];
        z_at<scalar_t, kH, true>(q, k, prev, W, noise, b, H, T, d, i, j, P, scale, dys, S, s);
#pragma unroll
        for (int h = 0; h < kH; ++h)
          if (h < H) dz[h * HS + i * RS + j] = s[h];
      }
      __syncthreads();
      // Rows (h, i): P = exp(Z − lse) in place.
      for (int r = tid; r < H * T; r += blockDim.x) {
        const float l = lse[b * H * T + r];  // row (b·H + h)·T + i = b·H·T + r
        float* zi = dz + r * RS;
        for (int j = 0; j < T; ++j) zi[j] = expf(zi[j] - l);
      }
      __syncthreads();
      // Columns (h, j): dV = Pᵀ gO.
      for (int r = tid; r < H * T; r += blockDim.x) {
        const int h = r / T, j = r % T;
        const int64_t bh = b * H + h;
        const float* pj = dz + h * HS + j;
        const scalar_t* gb = gout + bh * T * dv;
        for (int c = 0; c < dv; ++c) {
          float acc = 0.f;
          for (int i = 0; i < T; ++i) acc += pj[i * RS] * static_cast<float>(gb[i * dv + c]);
          dvo[(bh * T + j) * dv + c] = static_cast<scalar_t>(acc);
        }
      }
      __syncthreads();
      // Rows (h, i): dZ = gZ + P ⊙ (dP − rowsum(P ⊙ dP)), dP_ij = gO_i · v_j, in place of P.
      for (int r = tid; r < H * T; r += blockDim.x) {
        const int h = r / T, i = r % T;
        const int64_t bh = b * H + h, row = bh * T + i;
        const scalar_t* gi = gout + row * dv;
        const scalar_t* vb = v + bh * T * dv;
        float* dzi = dz + r * RS;
        float delta = 0.f;
        for (int j = 0; j < T; ++j) delta += dzi[j] * dot_rows(gi, vb + j * dv, dv);
        for (int j = 0; j < T; ++j) {
          const float g = gz != nullptr ? static_cast<float>(gz[bh * T * T + static_cast<int64_t>(i) * T + j]) : 0.f;
          dzi[j] = g + dzi[j] * (dot_rows(gi, vb + j * dv, dv) - delta);
        }
      }
      __syncthreads();
      if (P > 0) {
        // Positions: back through the head-MLP from the kept activations. dys: S → dZ (before dU).
        for (int pos = tid; pos < TT; pos += blockDim.x) {
          const int i = pos / T, j = pos % T;
          float g[kH], sv[kH];
#pragma unroll
          for (int h = 0; h < kH; ++h) {
            g[h] = 0.f;
            sv[h] = 0.f;
            if (h < H) {
              g[h] = dz[h * HS + i * RS + j];
              sv[h] = dys[h * S + pos];
              dys[h * S + pos] = g[h];
            }
          }
          float g1[kF];  // Σ_r w2[r, c] g2[r], then the gradient at A1's pre-activation
#pragma unroll
          for (int c = 0; c < kF; ++c) g1[c] = 0.f;
          for (int r = 0; r < F; ++r) {
            float x = 0.f;
#pragma unroll
            for (int h = 0; h < kH; ++h)
              if (h < H) x += w3[h * F + r] * g[h];
            const float g2 = x * (a2s[r * S + pos] > 0.f ? 1.f : kSlope);
            d2s[r * S + pos] = g2;
#pragma unroll
            for (int c = 0; c < kF; ++c)
              if (c < F) g1[c] += w2[r * F + c] * g2;
          }
          float du[kH];
#pragma unroll
          for (int h = 0; h < kH; ++h) du[h] = 0.f;
#pragma unroll
          for (int c = 0; c < kF; ++c)
            if (c < F) {
              const float g1c = g1[c] * (a1s[c * S + pos] > 0.f ? 1.f : kSlope);
              d1s[c * S + pos] = g1c;
#pragma unroll
              for (int h = 0; h < kH; ++h)
                if (h < H) du[h] += w1[c * H + h] * g1c;
            }
#pragma unroll
          for (int h = 0; h < kH; ++h)
            if (h < H && sv[h] != -INFINITY) dz[h * HS + i * RS + j] += du[h];
        }
        __syncthreads();
        // Weight elements: dW = Σ_p x[p] y[p] over the feature rows (bias: y = ones), added to this chunk's
        // row (written, not added, at its first sequence). Lane l starts at position l (bank note above).
        const int o_b1 = F * H, o_w2 = o_b1 + F, o_b2 = o_w2 + F * F, o_w3 = o_b2 + F, o_b3 = o_w3 + H * F;
        const int lane = tid & 31;
        for (int e = tid; e < P; e += blockDim.x) {
          const float *x, *y;
          if (e < o_b1) { x = d1s + (e / H) * S; y = us + (e % H) * S; }
          else if (e < o_w2) { x = d1s + (e - o_b1) * S; y = ones; }
          else if (e < o_b2) { x = d2s + ((e - o_w2) / F) * S; y = a1s + ((e - o_w2) % F) * S; }
          else if (e < o_w3) { x = d2s + (e - o_b2) * S; y = ones; }
          else if (e < o_b3) { x = dys + ((e - o_w3) / F) * S; y = a2s + ((e - o_w3) % F) * S; }
          else { x = dys + (e - o_b3) * S; y = ones; }
          float acc = 0.f;
          for (int t = 0, p = lane; t < S; ++t) {
            acc += x[p] * y[p];
            if (++p == S) p = 0;
          }
          part[e] = b == b_first ? acc : part[e] + acc;
        }
      }
      // Rows (h, i): dq and dprev.  Columns (h, j): dk.  (dz is final here.)
      for (int r = tid; r < H * T; r += blockDim.x) {
        const int h = r / T, i = r % T;
        const int64_t bh = b * H + h;
        const float* dzi = dz + r * RS;
        const scalar_t* kb = k + bh * T * d;
        for (int c = 0; c < d; ++c) {
          float acc = 0.f;
          for (int j = 0; j < T; ++j) acc += dzi[j] * static_cast<float>(kb[j * d + c]);
          dq[(bh * T + i) * d + c] = static_cast<scalar_t>(acc * scale);
        }
        if (dprev != nullptr)
          for (int j = 0; j < T; ++j)
            dprev[bh * T * T + static_cast<int64_t>(i) * T + j] = static_cast<scalar_t>(dzi[j]);
      }
      for (int r = tid; r < H * T; r += blockDim.x) {
        const int h = r / T, j = r % T;
        const int64_t bh = b * H + h;
        const float* dzj = dz + h * HS + j;
        const scalar_t* qb = q + bh * T * d;
        for (int c = 0; c < d; ++c) {
          float acc = 0.f;
          for (int i = 0; i < T; ++i) acc += dzj[i * RS] * static_cast<float>(qb[i * d + c]);
          dk[(bh * T + j) * d + c] = static_cast<scalar_t>(acc * scale);
        }
      }
      __syncthreads();
    }
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

// fn(std::integral_constant<int, kH>) for the head bucket kH ∈ {4, 8, 16} of H (H ≤ kH): three
// instantiations per kernel and dtype instead of sixteen; the unused heads are predicated off.
template <typename Fn>
void dispatch_heads(int64_t H, Fn&& fn) {
  if (H <= 4) fn(std::integral_constant<int, 4>{});
  else if (H <= 8) fn(std::integral_constant<int, 8>{});
  else fn(std::integral_constant<int, 16>{});
}

// Lets kKernel use up to kSmemLimit bytes of dynamic shared memory (every launch below asks for at most
// that), once per kernel and device: cudaFuncSetAttribute is a driver call we keep off the launch path.
template <auto kKernel>
void allow_max_dynamic_smem() {
  static std::once_flag once[C10_COMPILE_TIME_MAX_GPUS];
  const int dev = c10::cuda::current_device();
  TORCH_CHECK(dev >= 0 && dev < C10_COMPILE_TIME_MAX_GPUS, "nested_attention (CUDA): device index ", dev);
  std::call_once(once[dev], [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kSmemLimit)));
  });
}

// Slot layout, grid size and slot placement for `items` block work items next to P weights (depends on
// shapes only). Layouts in order of preference, the first whose slot fits kSmemLimit next to W wins:
//   1. RS = z_row_stride(T), S = roundup(T², 32): every phase but the positions phases' Z accesses
//      conflict-free (note at the top);
//   2. RS = T | 1 (odd, ≤ T + 1): rows phases still conflict-free, columns phases at most 3-way;
//   3. and S = max(T², 32) (CODA backward only; S ≥ 32 since the weight phase starts lane l at p = l):
//      positions phases still conflict-free, the weight phase no longer.
// If none fits, the slot goes to the global workspace (one slot per block, banks do not apply) with the
// smallest layout, 3, so that more blocks fit kWorkspaceLimit.
struct Launch {
  int64_t grid;
  bool smem_slot;
  int64_t smem_bytes;
  int RS, S;            // Z row stride, feature-row stride
  int64_t slot_floats;  // per block, with this RS and S
};
Launch plan(int64_t items, int64_t P, int64_t H, int64_t T, bool feature_rows) {
  const int64_t layouts[3][2] = {{z_row_stride(static_cast<int>(T)), round32(T * T)},
                                 {T | 1, round32(T * T)},
                                 {T | 1, std::max<int64_t>(T * T, 32)}};
  Launch l;
  l.smem_slot = false;
  for (const auto& rs_s : layouts) {
    l.RS = static_cast<int>(rs_s[0]);
    l.S = static_cast<int>(rs_s[1]);
    l.slot_floats = slot_floats(H, T, l.RS, l.S, feature_rows);
    l.smem_bytes = (round32(P) + l.slot_floats) * static_cast<int64_t>(sizeof(float));
    if (l.smem_bytes <= kSmemLimit) {
      l.smem_slot = true;
      break;
    }
  }
  int64_t cap = cuda::kMaxGridBlocks;
  if (!l.smem_slot) {  // layout 3, the last one tried
    l.smem_bytes = P * static_cast<int64_t>(sizeof(float));
    cap = std::min(cap, std::max<int64_t>(1, kWorkspaceLimit / (l.slot_floats * static_cast<int64_t>(sizeof(float)))));
  }
  l.grid = cuda::capped_grid(items, 1, cap);
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
  const Launch l = plan(B, P, H, T, false);
  at::Tensor ws = l.smem_slot ? at::empty({0}, q.options().dtype(at::kFloat))
                              : at::empty({l.grid * l.slot_floats}, q.options().dtype(at::kFloat));
  TNT_DISPATCH_CUDA_TYPES(q.scalar_type(), "nested_attention_cuda", [&] {
    dispatch_heads(H, [&](auto kh) {
      constexpr int kH = decltype(kh)::value;
      constexpr auto kernel = nested_fwd_kernel<scalar_t, kH>;
      if (l.smem_bytes > cuda::kDefaultDynamicSmemBytes) allow_max_dynamic_smem<kernel>();
      cuda::launch(kernel, static_cast<unsigned>(l.grid), kThreads, l.smem_bytes, scope.stream(),
                   q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                   prev.defined() ? prev.data_ptr<scalar_t>() : nullptr, W.data_ptr<float>(),
                   noise.defined() ? noise.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                   logits.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                   l.smem_slot ? nullptr : ws.data_ptr<float>(), l.smem_slot, l.slot_floats, B,
                   static_cast<int>(H), static_cast<int>(T), l.RS, static_cast<int>(d),
                   static_cast<int>(dv), static_cast<int>(P), static_cast<float>(scale));
    });
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
  const bool run = B * H * T > 0;
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dvt = at::empty_like(v);
  at::Tensor dprev = prev.defined() ? at::empty_like(prev) : at::empty({0}, q.options());
  std::vector<at::Tensor> result = {dq, dk, dvt, dprev};
  const at::Tensor W = mlp ? flat_weights(head_mlp, q) : at::empty({0}, q.options().dtype(at::kFloat));
  const int64_t P = W.numel();
  // Chunks of sequences (one partial row each with the MLP): at most kMaxPartialRows rows and
  // kPartialBytes of buffer, from B and P only. Every row gets ≥ 1 sequence, and its block writes all of
  // it, so the buffer needs no zero fill.
  int64_t seq_per_row = 1, rows = B;
  if (mlp && run) {
    const int64_t max_rows = std::clamp<int64_t>(kPartialBytes / (std::max<int64_t>(P, 1) * 4), 1, kMaxPartialRows);
    seq_per_row = cuda::ceil_div(B, max_rows);
    rows = cuda::ceil_div(B, seq_per_row);
  }
  at::Tensor partial = at::empty({mlp && run ? rows : 0, P}, q.options().dtype(at::kFloat));
  if (run) {
    const Launch l = plan(rows, P, H, T, mlp);
    at::Tensor ws = l.smem_slot ? at::empty({0}, q.options().dtype(at::kFloat))
                                : at::empty({l.grid * l.slot_floats}, q.options().dtype(at::kFloat));
    TNT_DISPATCH_CUDA_TYPES(q.scalar_type(), "nested_attention_backward_cuda", [&] {
      dispatch_heads(H, [&](auto kh) {
        constexpr int kH = decltype(kh)::value;
        constexpr auto kernel = nested_bwd_kernel<scalar_t, kH>;
        if (l.smem_bytes > cuda::kDefaultDynamicSmemBytes) allow_max_dynamic_smem<kernel>();
        cuda::launch(kernel, static_cast<unsigned>(l.grid), kThreads, l.smem_bytes, scope.stream(),
                     g.data_ptr<scalar_t>(), gz.defined() ? gz.data_ptr<scalar_t>() : nullptr,
                     q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                     prev.defined() ? prev.data_ptr<scalar_t>() : nullptr, W.data_ptr<float>(),
                     noise.defined() ? noise.data_ptr<scalar_t>() : nullptr, lse.data_ptr<float>(),
                     dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dvt.data_ptr<scalar_t>(),
                     prev.defined() ? dprev.data_ptr<scalar_t>() : nullptr, mlp ? partial.data_ptr<float>() : nullptr,
                     l.smem_slot ? nullptr : ws.data_ptr<float>(), l.smem_slot, l.slot_floats, B, seq_per_row,
                     rows, static_cast<int>(H), static_cast<int>(T), l.RS, l.S, static_cast<int>(d),
                     static_cast<int>(dv), static_cast<int>(P), static_cast<float>(scale));
      });
    });
  }
  if (mlp) {
    const at::Tensor total = at::sum(partial, 0);  // deterministic reduction over the chunk rows
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

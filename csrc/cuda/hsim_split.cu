// TinT's H_sim-split linear op on CUDA (docs/tint.md §1): same math as csrc/cpu/hsim_split.cpp.
// float32 / float16 / bfloat16; H <= 64 heads, head width d <= 256 (limits.h).
//
// x (N, D), D = H·d, a row viewed as x[h, k]:
//   mix:   z[n, g, k] = Σ_h x[n, h, k] M[k, h, g] + m[k, g]       M (d, H, H), m (d, H)
//   block: y[n, g, :] = z[n, g, :] @ A[g] + a[g]                   A (H, d, d), a (H, d)
//   backward: dz = dy A[g]ᵀ (dz = dy without the block);  dx[n, h, k] = Σ_g dz[n, g, k] M[k, h, g];
//             dA[g] = Σ_n z[n, g, :]ᵀ dy[n, g, :];  da = Σ_n dy;  dM[k, h, g] = Σ_n x[n, h, k] dz[n, g, k];
//             dm = Σ_n dz.
//
// Who computes what
//   cuBLAS, through ATen: the per-head GEMMs, batched over the H heads. Head g of an (N, D) tensor t is the
//   view heads(t) = t.view(N, H, d).transpose(0, 1): (H, N, d), strides (d, D, 1), i.e. a row-major matrix
//   with leading dimension D and batch stride d, which ATen hands to cuBLAS's strided-batched GEMM as it is
//   (no copy: ATen only copies an operand with no unit stride):
//     forward   y_g  = a_g + z_g A_g    at::baddbmm_out(heads(y), a (H, 1, d), heads(z), A): beta = 1 with the
//                                       bias broadcast over the rows as the C input (at::bmm_out without a bias)
//     backward  dz_g = dy_g A_gᵀ        at::bmm_out(heads(dz), heads(dy), A.transpose(1, 2)), into dx itself
//                                       without the mix
//               dA_g = z_gᵀ dy_g        at::bmm_out(dA, heads(z).transpose(1, 2), heads(dy))
//               da   = Σ_n dy           at::sum_out (column sums; deterministic, no atomics)
//   They run like any torch matmul: tensor cores for float16 / bfloat16 with float accumulation, TF32 for
//   float32 only where torch allows it (torch.backends.cuda.matmul.allow_tf32), on the current stream.
//   Ours: the cross-head mix along k, which is no GEMM cuBLAS can take (x[:, :, k] has no unit stride):
//     mix_kernel                z = mix(x) + m (the forward; recomputed in the backward for dA) and, TRANS,
//                               dx = mixᵀ(dz)
//     mix_wgrad_kernel          per chunk of rows, partial sums of dM (and of dm, as an extra row of ones)
//     mix_wgrad_reduce_kernel   dM, dm = the chunks' partials summed in chunk order
//   Each element of the mix is computed by one thread in float (fixed order over h); z and dz travel between
//   our kernels and cuBLAS in x's dtype (rounded once, as PyTorch's own einsum / bmm path rounds them).
//
// Every grid is 1-D on axis x; each block walks its work items t = blockIdx.x, + gridDim.x, ... (so no size
// hits the 65,535 limit of axes y / z, and any grid gives the same result). The weight-gradient chunks
// depend on the shapes only and nothing uses atomics, so the results are bitwise reproducible (cuBLAS is,
// run to run, on one GPU model). Temporaries: with both parts, z (N × D, x's dtype) in the forward and
// dz (N × D, x's dtype; reused for the recomputed z) in the backward; the dM / dm partials (float, at most
// kPartialFloats).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "tntkernels/cuda_utils.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/hsim_split.h"
#include "tntkernels/limits.h"

namespace tntkernels {
namespace {

using limits::hsim_split_cuda::kMaxHeadDim;
using limits::hsim_split_cuda::kMaxHeads;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKT = 32;        // coordinates k per tile: one per lane of a warp
constexpr int kKTP = kKT + 1;  // floats per row of mix_kernel's staged weights: kKT + 1 pad (see mix_kernel)
constexpr int kG = 4;          // mix_kernel: outputs o per thread
constexpr int kRT = 8;         // mix_kernel: rows per thread
constexpr int kTH = 4;         // mix_wgrad_kernel: h per thread
constexpr int kTG = 8;         // mix_wgrad_kernel: g per thread
constexpr int64_t kPartialFloats = 16LL << 20;  // at most 64 MB of float partials for dM / dm

// mix_kernel's weights in shared memory: H·OB rows of kKTP floats, H·OB <= kMaxMixWeights (mix_groups).
constexpr int kMaxMixWeights = 512;
constexpr int64_t kMaxMixSmemBytes = kMaxMixWeights * kKTP * sizeof(float);  // 67,584 B
static_assert(kMaxHeads * kG <= kMaxMixWeights, "mix_kernel must fit one output group of the largest H");
static_assert(kMaxMixSmemBytes <= 163 * 1024, "mix_kernel's shared memory must fit an sm_80 block (163 KB)");
static_assert(kThreads % 32 == 0 && kWarps % 4 == 0, "mix_kernel splits the warps into 1, 2 or 4 output groups");

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// out[n, o, k] = Σ_i in[n, i, k] W(k, i, o) (+ bias[k, o]) for the N rows, o < H, k < d, where
//   W(k, i, o) = M[k, i, o]   (the mix: i = h, o = g; bias = m)
//   W(k, i, o) = M[k, o, i]   (TRANS, its transpose: dx from dz, i = g, o = h; no bias).
// Work item: (chunk of rows_per_item rows, tile of kKT coordinates k0 + kk, block of OB = wo·kG outputs o0 + q),
// the output block fastest, so that the items that read the same rows of `in` (H > OB only) run side by side
// and share them through L2. With H <= OB (every H <= 16) one item covers all outputs: `in` is read once.
// Thread: lane = kk, so every load of `in` and store of `out` by a warp is 32 consecutive elements of a row;
// warp w = row group w / wo × output group w % wo; kRT rows × kG outputs accumulated in registers: per input i,
// kRT = 8 independent global loads (the kernel is memory-bound) and kG = 4 shared loads for 32 FMAs.
// __launch_bounds__(kThreads, 2): at most 128 registers, two blocks (16 warps) per SM, no spills.
// Shared memory ws: the item's weights W(k0 + kk, i, o0 + q) as floats, one row of kKTP floats (kk along it)
// per pair (i, q), row r = i·OB + q. Staging is a transposed store: the weights of one k are contiguous in
// global memory (M[k] is H × H) and run over r, a shared-memory row runs over kk. Warp w stages kk = w,
// w + kWarps, ..., its lanes taking 32 consecutive r: they write the words r·kKTP + kk, in banks
// (r + kk) mod 32, all different because a row is kKT + 1 = 33 floats (at 32 floats all 32 lanes would write
// one bank: a 32-way conflict). The compute reads the word r·kKTP + lane for a warp-uniform r: 32
// consecutive words, conflict-free.
template <bool TRANS, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) mix_kernel(const scalar_t* __restrict__ in,
                                                         const scalar_t* __restrict__ M,
                                                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                                         int64_t N, int H, int d, int wo, int64_t rows_per_item) {
  extern __shared__ float ws[];  // H·OB rows of kKTP floats
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int OB = wo * kG;
  const int q0 = (warp % wo) * kG;                     // this warp's outputs: o0 + q0 + q, q < kG
  const int64_t row_off = (warp / wo) * kRT;           // this warp's first row in a pass of the block
  const int64_t row_step = (kWarps / wo) * kRT;        // rows per pass of the block
  const int64_t D = static_cast<int64_t>(H) * d;
  const int k_tiles = (d + kKT - 1) / kKT, o_blocks = (H + OB - 1) / OB;
  const int64_t chunks = (N + rows_per_item - 1) / rows_per_item;
  const int64_t items = chunks * k_tiles * o_blocks;
  const int lg_ob = wo == 4 ? 4 : wo == 2 ? 3 : 2;  // OB = 1 << lg_ob
  const int staged = H * OB, si = OB * kKTP;  // weight (i, q) at ws[i·si + q·kKTP + kk]
  TNT_BLOCK_STRIDE_LOOP(item, items) {
    const int ob = static_cast<int>(item % o_blocks);
    const int kt = static_cast<int>(item / o_blocks % k_tiles);
    const int64_t chunk = item / (static_cast<int64_t>(o_blocks) * k_tiles);
    const int k0 = kt * kKT, o0 = ob * OB;
    __syncthreads();  // the previous item's weights are no longer read
    for (int kk = warp; kk < kKT; kk += kWarps) {
      const int k = k0 + kk;
      const scalar_t* Mk = M + static_cast<int64_t>(min(k, d - 1)) * H * H;  // M[k] (H × H); zeros past d
      for (int r = lane; r < staged; r += 32) {
        const int i = r >> lg_ob, q = r & (OB - 1), o = o0 + q;
        ws[r * kKTP + kk] = k < d && o < H ? to_f(Mk[TRANS ? o * H + i : i * H + o]) : 0.f;
      }
    }
    __syncthreads();
    const int k = k0 + lane;
    const bool k_ok = k < d;
    const int kc = k_ok ? k : d - 1;  // lanes past d load a valid column; their results are not stored
    const int64_t r_begin = chunk * rows_per_item, r_end = min(N, r_begin + rows_per_item);
    for (int64_t n0 = r_begin + row_off; n0 < r_end; n0 += row_step) {
      const int rows = static_cast<int>(min(static_cast<int64_t>(kRT), r_end - n0));
      const scalar_t* src[kRT];  // in[n0 + j, i, kc], advanced by d per i; rows past the chunk read its last row
#pragma unroll
      for (int j = 0; j < kRT; ++j) src[j] = in + (n0 + min(j, rows - 1)) * D + kc;
      float acc[kRT][kG];
#pragma unroll
      for (int q = 0; q < kG; ++q) {
        const int o = o0 + q0 + q;
        const float bq = (bias != nullptr && k_ok && o < H) ? to_f(bias[static_cast<int64_t>(k) * H + o]) : 0.f;
#pragma unroll
        for (int j = 0; j < kRT; ++j) acc[j][q] = bq;
      }
      const float* wi = ws + q0 * kKTP + lane;  // W(k0 + lane, i, o0 + q0 + q) at wi[q·kKTP]
#pragma unroll 2
      for (int i = 0; i < H; ++i, wi += si) {
        float xv[kRT];
#pragma unroll
        for (int j = 0; j < kRT; ++j) {
          xv[j] = to_f(*src[j]);
          src[j] += d;
        }
#pragma unroll
        for (int q = 0; q < kG; ++q) {
          const float wv = wi[q * kKTP];
#pragma unroll
          for (int j = 0; j < kRT; ++j) acc[j][q] = fmaf(xv[j], wv, acc[j][q]);
        }
      }
      if (!k_ok) continue;
      scalar_t* dst = out + n0 * D + k;  // out[n0 + j, o, k] at dst[j·D + o·d] (< kRT·D, 32-bit)
#pragma unroll
      for (int j = 0; j < kRT; ++j) {
        if (j >= rows) break;
#pragma unroll
        for (int q = 0; q < kG; ++q) {
          const int o = o0 + q0 + q;
          if (o < H) dst[j * static_cast<int>(D) + o * d] = static_cast<scalar_t>(acc[j][q]);
        }
      }
    }
  }
}

// partial[c][h][g][k] = Σ_{n in chunk c} xh[n, h, k] dz[n, g, k] for h < hr, g < H, k < d, rows in increasing
// order, where xh[n, h, k] = x[n, h, k] for h < H and xh[n, H, k] = 1 (hr = H + 1: that row sums dm).
// Work item: (chunk c of chunk_rows rows, tile of kKT coordinates k, group of kWarps (h, g) tiles), the group
// fastest. Thread: lane = k - k0, warp = one tile of kTH h × kTG g, its sums in registers. Every load (a row
// of x or dz, 32 consecutive k per warp) and every store (k fastest) is coalesced; the warps of a block that
// need the same x or dz values read them together (L1). No shared memory and no barrier.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) mix_wgrad_kernel(const scalar_t* __restrict__ x,
                                                            const scalar_t* __restrict__ dz,
                                                            float* __restrict__ partial, int64_t N, int H, int d,
                                                            int hr, int64_t chunk_rows, int64_t n_chunks) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t D = static_cast<int64_t>(H) * d, P = static_cast<int64_t>(hr) * H * d;
  const int g_tiles = (H + kTG - 1) / kTG, tiles = (hr + kTH - 1) / kTH * g_tiles;
  const int groups = (tiles + kWarps - 1) / kWarps, k_tiles = (d + kKT - 1) / kKT;
  const int64_t items = n_chunks * k_tiles * groups;
  TNT_BLOCK_STRIDE_LOOP(item, items) {
    const int grp = static_cast<int>(item % groups);
    const int kt = static_cast<int>(item / groups % k_tiles);
    const int64_t c = item / (static_cast<int64_t>(groups) * k_tiles);
    const int t = grp * kWarps + warp, k = kt * kKT + lane;
    if (t >= tiles || k >= d) continue;  // no barrier in this kernel: idle threads skip the item
    const int h0 = t / g_tiles * kTH, g0 = t % g_tiles * kTG;
    const int64_t r0 = c * chunk_rows, r1 = min(N, r0 + chunk_rows);
    float acc[kTH][kTG];
#pragma unroll
    for (int a = 0; a < kTH; ++a)
#pragma unroll
      for (int q = 0; q < kTG; ++q) acc[a][q] = 0.f;
    const scalar_t* xr = x + r0 * D + k;
    const scalar_t* dr = dz + r0 * D + k;
#pragma unroll 2
    for (int64_t n = r0; n < r1; ++n, xr += D, dr += D) {
      float xv[kTH], dv[kTG];
#pragma unroll
      for (int a = 0; a < kTH; ++a) {
        const int h = h0 + a;  // warp-uniform: no divergence
        xv[a] = h < H ? to_f(xr[h * d]) : (h < hr ? 1.f : 0.f);
      }
#pragma unroll
      for (int q = 0; q < kTG; ++q) {
        const int g = g0 + q;
        dv[q] = g < H ? to_f(dr[g * d]) : 0.f;
      }
#pragma unroll
      for (int a = 0; a < kTH; ++a)
#pragma unroll
        for (int q = 0; q < kTG; ++q) acc[a][q] = fmaf(xv[a], dv[q], acc[a][q]);
    }
    float* dst = partial + c * P + k;
#pragma unroll
    for (int a = 0; a < kTH; ++a) {
      const int h = h0 + a;
      if (h >= hr) continue;
#pragma unroll
      for (int q = 0; q < kTG; ++q) {
        const int g = g0 + q;
        if (g < H) dst[(static_cast<int64_t>(h) * H + g) * d] = acc[a][q];
      }
    }
  }
}

// dM[k, h, g] = Σ_c partial[c][h][g][k] for h < H, and dm[k, g] = Σ_c partial[c][H][g][k] when hr = H + 1,
// c increasing. Reads coalesced (one thread per partial element); dM, dm are written once.
template <typename scalar_t>
__global__ void mix_wgrad_reduce_kernel(const float* __restrict__ partial, scalar_t* __restrict__ dM,
                                        scalar_t* __restrict__ dm, int H, int d, int hr, int64_t n_chunks) {
  const int64_t P = static_cast<int64_t>(hr) * H * d;
  TNT_GRID_STRIDE_LOOP(i, P) {
    float s = 0.f;
    for (int64_t c = 0; c < n_chunks; ++c) s += partial[c * P + i];
    const int hg = static_cast<int>(i / d), k = static_cast<int>(i - static_cast<int64_t>(hg) * d);
    const int h = hg / H, g = hg - h * H;
    if (h < H) dM[(static_cast<int64_t>(k) * H + h) * H + g] = static_cast<scalar_t>(s);
    else dm[static_cast<int64_t>(k) * H + g] = static_cast<scalar_t>(s);
  }
}

// Rows per chunk of the dM / dm reduction with `params` floats per chunk: at least `min_rows`, at most
// kPartialFloats floats of partials in all. Depends on the shapes only.
int64_t chunk_rows_for(int64_t N, int64_t params, int64_t min_rows) {
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(1024, kPartialFloats / std::max<int64_t>(1, params)));
  return std::max<int64_t>(min_rows, (N + max_chunks - 1) / max_chunks);
}

void check_cuda_range(const at::Tensor& x, int64_t H, int64_t d) {
  TORCH_CHECK(x.is_cuda(), "hsim_split_linear (CUDA): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "hsim_split_linear (CUDA): supports float32, float16 and bfloat16, got float64");
  TORCH_CHECK(H <= kMaxHeads && d <= kMaxHeadDim, "hsim_split_linear (CUDA): supports H <= ", kMaxHeads,
              " heads and head width d <= ", kMaxHeadDim, "; got H=", H, ", d=", d);
}

// cuBLAS takes 32-bit sizes: the head GEMMs have N rows (or a reduction over N).
void check_gemm_rows(int64_t N) {
  TORCH_CHECK(N <= std::numeric_limits<int>::max(), "hsim_split_linear (CUDA): with block_weight, at most 2^31 - 1 ",
              "rows (cuBLAS takes 32-bit sizes); got N=", N);
}

template <typename scalar_t>
const scalar_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

at::Tensor opt_contig(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

// The heads of t (N, H·d) as a batch of H matrices: (H, N, d), strides (d, H·d, 1) (head g = t[:, g·d:(g+1)·d]).
at::Tensor heads(const at::Tensor& t, int64_t H, int64_t d) { return t.view({t.size(0), H, d}).transpose(0, 1); }

// Output groups per block of mix_kernel (1, 2 or 4; OB = wo·kG outputs per item): the fewest that cover all
// H outputs (every H <= 16 then needs one item per rows × k tile, which reads x once), as long as the
// item's weights fit (H·OB <= kMaxMixWeights, i.e. at most kMaxMixSmemBytes of shared memory).
int mix_groups(int64_t H) {
  int wo = 1;
  while (wo < 4 && wo * kG < H && H * 2 * wo * kG <= kMaxMixWeights) wo *= 2;
  return wo;
}

template <bool TRANS, typename scalar_t>
void launch_mix(const scalar_t* in, const scalar_t* M, const scalar_t* bias, scalar_t* out, int64_t N, int64_t H,
                int64_t d, cudaStream_t stream) {
  const int wo = mix_groups(H);
  const int64_t OB = wo * kG, row_step = (kWarps / wo) * kRT;
  const int64_t smem = H * OB * kKTP * static_cast<int64_t>(sizeof(float));  // <= kMaxMixSmemBytes
  // Row tiles per item: enough items for ~8 blocks per SM, and as many rows as that allows to share the staged
  // weights. The split changes no result (each output is one thread's fixed-order sum).
  const int64_t tiles = cuda::ceil_div(N, row_step), per_rows = cuda::ceil_div(d, kKT) * cuda::ceil_div(H, OB);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles_per_item = std::max<int64_t>(1, tiles * per_rows / (8 * sms));
  const int64_t items = cuda::ceil_div(tiles, tiles_per_item) * per_rows;
  const auto kernel = mix_kernel<TRANS, scalar_t>;
  cuda::allow_dynamic_smem(kernel, smem);
  cuda::launch(kernel, cuda::capped_grid(items, 1), kThreads, static_cast<size_t>(smem), stream, in, M, bias, out, N,
               static_cast<int>(H), static_cast<int>(d), wo, tiles_per_item * row_step);
}

// dM (and dm when dm is not null) from x and dz: per-chunk partials, then their sum in chunk order.
template <typename scalar_t>
void launch_mix_wgrad(const scalar_t* x, const scalar_t* dz, scalar_t* dM, scalar_t* dm, int64_t N, int64_t H,
                      int64_t d, const at::Tensor& like, cudaStream_t stream) {
  const int64_t hr = H + (dm != nullptr ? 1 : 0), P = hr * H * d;
  const int64_t rows = chunk_rows_for(N, P, 64), n_chunks = cuda::ceil_div(N, rows);
  at::Tensor partial = at::empty({n_chunks, P}, like.options().dtype(at::kFloat));
  const int64_t tiles = cuda::ceil_div(hr, kTH) * cuda::ceil_div(H, kTG);
  const int64_t items = n_chunks * cuda::ceil_div(d, kKT) * cuda::ceil_div(tiles, kWarps);
  cuda::launch(mix_wgrad_kernel<scalar_t>, cuda::capped_grid(items, 1), kThreads, 0, stream, x, dz,
               partial.data_ptr<float>(), N, static_cast<int>(H), static_cast<int>(d), static_cast<int>(hr), rows,
               n_chunks);
  cuda::launch(mix_wgrad_reduce_kernel<scalar_t>, cuda::capped_grid(P, kThreads), kThreads, 0, stream,
               partial.data_ptr<float>(), dM, dm, static_cast<int>(H), static_cast<int>(d), static_cast<int>(hr),
               n_chunks);
}

at::Tensor hsim_split_linear_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& M_in,
                                  const c10::optional<at::Tensor>& m_in, const c10::optional<at::Tensor>& A_in,
                                  const c10::optional<at::Tensor>& a_in) {
  const std::pair<int64_t, int64_t> hd = check_hsim_split_inputs(x_in, M_in, m_in, A_in, a_in);
  const int64_t H = hd.first, d = hd.second;
  check_cuda_range(x_in, H, d);
  const cuda::DeviceScope scope(x_in);
  const at::Tensor x = x_in.contiguous(), M = opt_contig(M_in), m = opt_contig(m_in), A = opt_contig(A_in),
                   a = opt_contig(a_in);
  const int64_t N = x.size(0);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  if (!M.defined() && !A.defined()) return y.copy_(x);
  if (A.defined()) check_gemm_rows(N);
  // z = mix(x) + m (ours): into y without the block, else into a temporary; z = x without the mix.
  at::Tensor z = x;
  if (M.defined()) {
    z = A.defined() ? at::empty_like(x, at::MemoryFormat::Contiguous) : y;
    TNT_DISPATCH_CUDA_TYPES(x.scalar_type(), "hsim_split_linear_cuda", [&] {
      launch_mix<false>(x.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), opt_ptr<scalar_t>(m), z.data_ptr<scalar_t>(),
                        N, H, d, scope.stream());
    });
  }
  if (A.defined()) {  // y_g = a_g + z_g A_g (cuBLAS, all heads in one batched GEMM)
    at::Tensor yh = heads(y, H, d);
    if (a.defined()) at::baddbmm_out(yh, a.view({H, 1, d}), heads(z, H, d), A);
    else at::bmm_out(yh, heads(z, H, d), A);
  }
  return y;
}

std::vector<at::Tensor> hsim_split_linear_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                        const c10::optional<at::Tensor>& M_in,
                                                        const c10::optional<at::Tensor>& m_in,
                                                        const c10::optional<at::Tensor>& A_in,
                                                        const c10::optional<at::Tensor>& a_in) {
  const std::pair<int64_t, int64_t> hd = check_hsim_split_inputs(x_in, M_in, m_in, A_in, a_in);
  const int64_t H = hd.first, d = hd.second;
  check_hsim_split_backward_inputs(grad_y_in, x_in);
  check_cuda_range(x_in, H, d);
  const cuda::DeviceScope scope(x_in);
  const at::Tensor x = x_in.contiguous(), gy = grad_y_in.contiguous(), M = opt_contig(M_in), m = opt_contig(m_in),
                   A = opt_contig(A_in), a = opt_contig(a_in);
  const int64_t N = x.size(0), D = H * d;
  const bool mix = M.defined(), block = A.defined();
  std::vector<at::Tensor> grads = hsim_split_grad_outputs(x, H, d, mix, m.defined(), block, a.defined());
  if (N == 0 || D == 0) return grads;  // weight gradients zero-filled (empty sums)
  at::Tensor &dx = grads[0], &dM = grads[1], &dm = grads[2], &dA = grads[3], &da = grads[4];
  if (!mix && !block) {
    dx.copy_(gy);
    return grads;
  }
  if (block) check_gemm_rows(N);
  const cudaStream_t stream = scope.stream();
  // dz_g = dy_g A_gᵀ (cuBLAS), straight into dx without the mix; dz = dy without the block.
  at::Tensor dz = gy;
  if (block) {
    dz = mix ? at::empty_like(x, at::MemoryFormat::Contiguous) : dx;
    at::Tensor dzh = heads(dz, H, d);
    at::bmm_out(dzh, heads(gy, H, d), A.transpose(1, 2));
  }
  if (mix) {  // dx = mixᵀ(dz); dM, dm from x and dz (ours)
    TNT_DISPATCH_CUDA_TYPES(x.scalar_type(), "hsim_split_linear_backward_cuda", [&] {
      const scalar_t* dzp = dz.data_ptr<scalar_t>();
      launch_mix<true>(dzp, M.data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), dx.data_ptr<scalar_t>(), N,
                       H, d, stream);
      launch_mix_wgrad(x.data_ptr<scalar_t>(), dzp, dM.data_ptr<scalar_t>(),
                       m.defined() ? dm.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr), N, H, d, x, stream);
    });
  }
  if (block) {  // dA_g = z_gᵀ dy_g (cuBLAS), z recomputed into dz's buffer (read by the kernels above, same stream)
    at::Tensor z = x;
    if (mix) {
      z = dz;
      TNT_DISPATCH_CUDA_TYPES(x.scalar_type(), "hsim_split_linear_backward_cuda", [&] {
        launch_mix<false>(x.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), opt_ptr<scalar_t>(m),
                          z.data_ptr<scalar_t>(), N, H, d, stream);
      });
    }
    at::bmm_out(dA, heads(z, H, d).transpose(1, 2), heads(gy, H, d));
    if (a.defined()) {  // da = Σ_n dy, the column sums of dy (N, D) as (H, d)
      at::Tensor da_flat = da.view({D});
      at::sum_out(da_flat, gy, at::IntArrayRef{0});
    }
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CUDA, m) {
  m.impl("hsim_split_linear", &hsim_split_linear_cuda);
  m.impl("hsim_split_linear_backward", &hsim_split_linear_backward_cuda);
}

}  // namespace tntkernels

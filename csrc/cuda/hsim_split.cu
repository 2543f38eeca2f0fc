// TinT's H_sim-split linear op on CUDA (docs/tint.md §1): same math as csrc/cpu/hsim_split.cpp.
// float32 / float16 / bfloat16 with float accumulation; H <= 64 heads, head width d <= 256.
//
// x (N, D), D = H·d:  z[n, g, k] = Σ_h x[n, h, k] M[k, h, g] + m[k, g];  y[n, g, :] = z[n, g, :] A[g] + a[g].
//
// Kernels (every grid is 1-D on axis x; each block walks its work items t = blockIdx.x, + gridDim.x, ...,
// so no size hits the 65,535 limit of axes y / z):
//   head_gemm:  one item per (tile of kBM rows, head g). The prologue forms the (kBM × d) input tile in
//               shared memory (z from x through the mix, or the rows of x / dy as they are); then, for
//               each block of kBN output columns, the (kBM × d) · (d × kBN) product runs over chunks of kBK
//               rows of A[g] (or of A[g]ᵀ for dz = dy A[g]ᵀ) staged in shared memory, 2 × 4 outputs per
//               thread in float registers; the bias is added in the epilogue.
//   mix:        one thread per output element: out[n, g, k] = Σ_h in[n, h, k] W(k, h, g) (+ m[k, g]), with
//               W = M (z) or W(k, h, g) = M[k, g, h] (dx = mix transpose of dz).
//   wgrad_block: dA partials, one item per (row chunk c, head g, 64 × 64 tile of A[g]): Σ over the chunk's
//               rows of z[n, g, k] dy[n, g, j], staged through shared memory, written to partial[c].
//   wgrad_mix:  dM partials, one thread per (row chunk c, k, h, group of 16 g's), summing the chunk's rows.
//   colsum:     da / dm partials, one thread per (row chunk c, column).
//   reduce:     out[i] = Σ_c partial[c, i] in increasing c, cast to the output dtype.
// The chunk sizes depend on the shapes only; there are no atomics, so every result is bitwise
// reproducible. Backward temporaries (float, N × D): dz when both parts are present, z when both parts
// are present.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
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
constexpr int kBM = 32;  // rows per head_gemm tile
constexpr int kBN = 64;  // output columns per step
constexpr int kBK = 32;  // rows of A[g] staged per step
constexpr int kWT = 64;  // dA tile (kWT × kWT)
constexpr int kWR = 16;  // rows staged per step in wgrad_block
constexpr int64_t kPartialFloats = 16LL << 20;  // at most 64 MB of float partials per weight gradient

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// Rows [n0, n0 + kBM) of head g into zs (kBM × d, row stride ld_s): mix of x (MIX) or the input's own slice.
template <bool MIX, typename in_t, typename scalar_t>
__device__ __forceinline__ void load_tile(float* zs, int ld_s, const in_t* __restrict__ in,
                                          const scalar_t* __restrict__ M, const scalar_t* __restrict__ mb, int64_t n0,
                                          int64_t N, int H, int d, int g) {
  const int64_t D = static_cast<int64_t>(H) * d;
  for (int idx = threadIdx.x; idx < kBM * d; idx += blockDim.x) {
    const int r = idx / d, k = idx % d;
    const int64_t n = n0 + r;
    float v = 0.f;
    if (n < N) {
      if (MIX) {
        const in_t* xr = in + n * D + k;
        const scalar_t* w = M + static_cast<int64_t>(k) * H * H + g;  // M[k, h, g] at w[h·H]
        for (int h = 0; h < H; ++h) v += to_f(xr[static_cast<int64_t>(h) * d]) * to_f(w[h * H]);
        if (mb) v += to_f(mb[static_cast<int64_t>(k) * H + g]);
      } else {
        v = to_f(in[n * D + static_cast<int64_t>(g) * d + k]);
      }
    }
    zs[r * ld_s + k] = v;
  }
}

// out[n, g, j] = Σ_k zin[n, g, k] B_g[k, j] (+ bias[g, j]), B_g = A[g] (TRANS_B false) or A[g]ᵀ.
template <bool MIX, bool TRANS_B, typename in_t, typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) head_gemm_kernel(const in_t* __restrict__ in,
                                                             const scalar_t* __restrict__ M,
                                                             const scalar_t* __restrict__ mb,
                                                             const scalar_t* __restrict__ A,
                                                             const scalar_t* __restrict__ bias, out_t* __restrict__ out,
                                                             int64_t N, int H, int d) {
  extern __shared__ float smem[];
  __shared__ float bs[kBK][kBN];
  const int ld_s = d + 1;
  float* zs = smem;  // kBM × (d + 1)
  const int64_t D = static_cast<int64_t>(H) * d;
  const int64_t row_tiles = (N + kBM - 1) / kBM;
  const int64_t items = row_tiles * H;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 × 16 threads: rows ty, ty + 16; cols tx + 16 c
  TNT_BLOCK_STRIDE_LOOP(item, items) {
    const int g = static_cast<int>(item % H);
    const int64_t n0 = (item / H) * kBM;
    __syncthreads();  // zs of the previous item is no longer read
    load_tile<MIX>(zs, ld_s, in, M, mb, n0, N, H, d, g);
    const scalar_t* Ag = A + static_cast<int64_t>(g) * d * d;
    for (int j0 = 0; j0 < d; j0 += kBN) {
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      for (int k0 = 0; k0 < d; k0 += kBK) {
        __syncthreads();  // zs written / bs of the previous step no longer read
        for (int idx = threadIdx.x; idx < kBK * kBN; idx += blockDim.x) {
          int kk, jj;
          if (TRANS_B) {  // B[k][j] = A[g][j][k]: consecutive threads read consecutive k
            kk = idx % kBK;
            jj = idx / kBK;
          } else {
            jj = idx % kBN;
            kk = idx / kBN;
          }
          const int k = k0 + kk, j = j0 + jj;
          float v = 0.f;
          if (k < d && j < d) v = to_f(TRANS_B ? Ag[static_cast<int64_t>(j) * d + k] : Ag[static_cast<int64_t>(k) * d + j]);
          bs[kk][jj] = v;
        }
        __syncthreads();
        const int kmax = min(kBK, d - k0);
        for (int kk = 0; kk < kmax; ++kk) {
          const float a0 = zs[ty * ld_s + k0 + kk], a1 = zs[(ty + 16) * ld_s + k0 + kk];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float b = bs[kk][tx + 16 * c];
            acc[0][c] += a0 * b;
            acc[1][c] += a1 * b;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t n = n0 + ty + 16 * i;
        if (n >= N) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int j = j0 + tx + 16 * c;
          if (j >= d) continue;
          float v = acc[i][c];
          if (bias) v += to_f(bias[static_cast<int64_t>(g) * d + j]);
          out[n * D + static_cast<int64_t>(g) * d + j] = static_cast<out_t>(v);
        }
      }
    }
  }
}

// out[n, g, k] = Σ_h in[n, h, k] W(k, h, g) (+ mb[k, g]); W(k, h, g) = M[k, h, g], or M[k, g, h] when TRANS.
template <bool TRANS, typename in_t, typename scalar_t, typename out_t>
__global__ void mix_kernel(const in_t* __restrict__ in, const scalar_t* __restrict__ M, const scalar_t* __restrict__ mb,
                           out_t* __restrict__ out, int64_t N, int H, int d) {
  const int64_t D = static_cast<int64_t>(H) * d, total = N * D;
  TNT_GRID_STRIDE_LOOP(i, total) {
    const int64_t n = i / D;
    const int c = static_cast<int>(i - n * D), g = c / d, k = c % d;
    const in_t* xr = in + n * D + k;
    const scalar_t* w = M + static_cast<int64_t>(k) * H * H;
    float v = mb ? to_f(mb[static_cast<int64_t>(k) * H + g]) : 0.f;
    for (int h = 0; h < H; ++h)
      v += to_f(xr[static_cast<int64_t>(h) * d]) * to_f(TRANS ? w[g * H + h] : w[h * H + g]);
    out[i] = static_cast<out_t>(v);
  }
}

// partial[c][g][k][j] = Σ_{n in chunk c} z[n, g, k] dy[n, g, j], tiles of kWT × kWT, 4 × 4 per thread.
template <typename z_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads) wgrad_block_kernel(const z_t* __restrict__ z,
                                                               const scalar_t* __restrict__ dy,
                                                               float* __restrict__ partial, int64_t N, int H, int d,
                                                               int64_t chunk_rows, int64_t n_chunks) {
  __shared__ float zs[kWR][kWT + 1];
  __shared__ float gs[kWR][kWT + 1];
  const int64_t D = static_cast<int64_t>(H) * d;
  const int tiles = (d + kWT - 1) / kWT;
  const int64_t items = n_chunks * H * tiles * tiles;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // k = k0 + ty + 16 i, j = j0 + tx + 16 c
  TNT_BLOCK_STRIDE_LOOP(item, items) {
    int64_t rest = item;
    const int jt = static_cast<int>(rest % tiles);
    rest /= tiles;
    const int kt = static_cast<int>(rest % tiles);
    rest /= tiles;
    const int g = static_cast<int>(rest % H);
    const int64_t c = rest / H;
    const int k0 = kt * kWT, j0 = jt * kWT;
    const int64_t r0 = c * chunk_rows, r1 = min(N, r0 + chunk_rows);
    float acc[4][4] = {};
    for (int64_t nb = r0; nb < r1; nb += kWR) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < kWR * kWT; idx += blockDim.x) {
        const int rr = idx / kWT, cc = idx % kWT;
        const int64_t n = nb + rr;
        const bool okr = n < r1;
        zs[rr][cc] = (okr && k0 + cc < d) ? to_f(z[n * D + static_cast<int64_t>(g) * d + k0 + cc]) : 0.f;
        gs[rr][cc] = (okr && j0 + cc < d) ? to_f(dy[n * D + static_cast<int64_t>(g) * d + j0 + cc]) : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int rr = 0; rr < kWR; ++rr) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = zs[rr][ty + 16 * i];
#pragma unroll
        for (int q = 0; q < 4; ++q) b[q] = gs[rr][tx + 16 * q];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[i][q] += a[i] * b[q];
      }
    }
    float* out = partial + c * H * static_cast<int64_t>(d) * d + static_cast<int64_t>(g) * d * d;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = k0 + ty + 16 * i;
      if (k >= d) continue;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = j0 + tx + 16 * q;
        if (j < d) out[static_cast<int64_t>(k) * d + j] = acc[i][q];
      }
    }
  }
}

constexpr int kGGroup = 16;

// partial[c][k][h][g] = Σ_{n in chunk c} x[n, h, k] dz[n, g, k]; one thread per (c, h, g-group, k).
template <typename x_t, typename dz_t>
__global__ void wgrad_mix_kernel(const x_t* __restrict__ x, const dz_t* __restrict__ dz, float* __restrict__ partial,
                                 int64_t N, int H, int d, int64_t chunk_rows, int64_t n_chunks) {
  const int64_t D = static_cast<int64_t>(H) * d;
  const int groups = (H + kGGroup - 1) / kGGroup;
  const int64_t total = n_chunks * H * groups * d;
  TNT_GRID_STRIDE_LOOP(i, total) {
    int64_t rest = i;
    const int k = static_cast<int>(rest % d);
    rest /= d;
    const int gg = static_cast<int>(rest % groups);
    rest /= groups;
    const int h = static_cast<int>(rest % H);
    const int64_t c = rest / H;
    const int g0 = gg * kGGroup, ng = min(kGGroup, H - g0);
    float acc[kGGroup];
#pragma unroll
    for (int q = 0; q < kGGroup; ++q) acc[q] = 0.f;
    const int64_t r0 = c * chunk_rows, r1 = min(N, r0 + chunk_rows);
    for (int64_t n = r0; n < r1; ++n) {
      const float xv = to_f(x[n * D + static_cast<int64_t>(h) * d + k]);
      const dz_t* dr = dz + n * D + k;
#pragma unroll
      for (int q = 0; q < kGGroup; ++q)
        if (q < ng) acc[q] += xv * to_f(dr[static_cast<int64_t>(g0 + q) * d]);
    }
    float* out = partial + c * D * H + (static_cast<int64_t>(k) * H + h) * H + g0;
#pragma unroll
    for (int q = 0; q < kGGroup; ++q)
      if (q < ng) out[q] = acc[q];
  }
}

// partial[c][col] = Σ_{n in chunk c} in[n, col] for D columns.
template <typename in_t>
__global__ void colsum_kernel(const in_t* __restrict__ in, float* __restrict__ partial, int64_t N, int64_t D,
                              int64_t chunk_rows, int64_t n_chunks) {
  const int64_t total = n_chunks * D;
  TNT_GRID_STRIDE_LOOP(i, total) {
    const int64_t c = i / D, col = i - c * D;
    const int64_t r0 = c * chunk_rows, r1 = min(N, r0 + chunk_rows);
    float s = 0.f;
    for (int64_t n = r0; n < r1; ++n) s += to_f(in[n * D + col]);
    partial[i] = s;
  }
}

// out[i] = Σ_c partial[c][i] (c increasing).
template <typename out_t>
__global__ void reduce_kernel(const float* __restrict__ partial, out_t* __restrict__ out, int64_t P, int64_t n_chunks) {
  TNT_GRID_STRIDE_LOOP(i, P) {
    float s = 0.f;
    for (int64_t c = 0; c < n_chunks; ++c) s += partial[c * P + i];
    out[i] = static_cast<out_t>(s);
  }
}

// Rows per chunk of a weight-gradient reduction with `params` floats per chunk: at least `min_rows`,
// at most kPartialFloats floats of partials in all. Depends on the shapes only.
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

template <typename scalar_t>
const scalar_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

at::Tensor opt_contig(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

template <bool MIX, bool TRANS_B, typename in_t, typename scalar_t, typename out_t>
void launch_head_gemm(const in_t* in, const scalar_t* M, const scalar_t* mb, const scalar_t* A, const scalar_t* bias,
                      out_t* out, int64_t N, int64_t H, int64_t d, cudaStream_t stream) {
  const int64_t items = (N + kBM - 1) / kBM * H;
  static_assert((kBM * (kMaxHeadDim + 1) + kBK * kBN) * sizeof(float) <= cuda::kDefaultDynamicSmemBytes,
                "head_gemm's shared memory (zs for d <= kMaxHeadDim, and bs) must fit in 48 KB");
  const size_t smem = static_cast<size_t>(kBM) * (d + 1) * sizeof(float);  // ≤ 32·257·4 B; with bs < 48 KB
  cuda::launch(head_gemm_kernel<MIX, TRANS_B, in_t, scalar_t, out_t>, cuda::capped_grid(items, 1), kThreads, smem,
               stream, in, M, mb, A, bias, out, N, static_cast<int>(H), static_cast<int>(d));
}

template <bool TRANS, typename in_t, typename scalar_t, typename out_t>
void launch_mix(const in_t* in, const scalar_t* M, const scalar_t* mb, out_t* out, int64_t N, int64_t H, int64_t d,
                cudaStream_t stream) {
  cuda::launch(mix_kernel<TRANS, in_t, scalar_t, out_t>, cuda::capped_grid(N * H * d, kThreads), kThreads, 0, stream,
               in, M, mb, out, N, static_cast<int>(H), static_cast<int>(d));
}

// out[i] = Σ_c partial[c][i] for i < P, in the output dtype.
template <typename out_t>
void launch_reduce(const at::Tensor& partial, out_t* out, int64_t P, int64_t n_chunks, cudaStream_t stream) {
  cuda::launch(reduce_kernel<out_t>, cuda::capped_grid(P, kThreads), kThreads, 0, stream, partial.data_ptr<float>(),
               out, P, n_chunks);
}

template <typename in_t, typename out_t>
void column_sums(const in_t* in, out_t* out, int64_t N, int64_t D, const at::Tensor& like, cudaStream_t stream) {
  const int64_t rows = chunk_rows_for(N, D, 64), n_chunks = (N + rows - 1) / rows;
  at::Tensor partial = at::empty({n_chunks, D}, like.options().dtype(at::kFloat));
  cuda::launch(colsum_kernel<in_t>, cuda::capped_grid(n_chunks * D, kThreads), kThreads, 0, stream, in,
               partial.data_ptr<float>(), N, D, rows, n_chunks);
  launch_reduce(partial, out, D, n_chunks, stream);
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
  const cudaStream_t stream = scope.stream();
  TNT_DISPATCH_CUDA_TYPES(x.scalar_type(), "hsim_split_linear_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (!A.defined()) {
      launch_mix<false>(xp, M.data_ptr<scalar_t>(), opt_ptr<scalar_t>(m), yp, N, H, d, stream);
    } else if (M.defined()) {
      launch_head_gemm<true, false>(xp, M.data_ptr<scalar_t>(), opt_ptr<scalar_t>(m), A.data_ptr<scalar_t>(),
                                    opt_ptr<scalar_t>(a), yp, N, H, d, stream);
    } else {
      launch_head_gemm<false, false>(xp, static_cast<const scalar_t*>(nullptr), static_cast<const scalar_t*>(nullptr),
                                     A.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a), yp, N, H, d, stream);
    }
  });
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
  const cudaStream_t stream = scope.stream();
  const at::TensorOptions fopt = x.options().dtype(at::kFloat);
  TNT_DISPATCH_CUDA_TYPES(x.scalar_type(), "hsim_split_linear_backward_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    const scalar_t* Mp = opt_ptr<scalar_t>(M);
    const scalar_t* Ap = opt_ptr<scalar_t>(A);
    const scalar_t* none = nullptr;
    // dz = dy A[g]ᵀ (float workspace when the mix still needs it, else straight into dx).
    at::Tensor dzf;
    if (block) {
      if (mix) {
        dzf = at::empty({N, D}, fopt);
        launch_head_gemm<false, true>(gp, none, none, Ap, none, dzf.data_ptr<float>(), N, H, d, stream);
      } else {
        launch_head_gemm<false, true>(gp, none, none, Ap, none, dx.data_ptr<scalar_t>(), N, H, d, stream);
      }
    }
    if (mix) {
      // dx = mix transpose of dz; dM, dm from x and dz (the float workspace, or dy itself without the block).
      const int64_t mrows = chunk_rows_for(N, D * H, 64), mchunks = (N + mrows - 1) / mrows;
      at::Tensor partial = at::empty({mchunks, D * H}, fopt);
      const int64_t items = mchunks * H * ((H + kGGroup - 1) / kGGroup) * d;
      const auto mix_grads = [&](const auto* dz) {
        using dz_t = std::remove_cv_t<std::remove_pointer_t<decltype(dz)>>;
        launch_mix<true>(dz, Mp, none, dx.data_ptr<scalar_t>(), N, H, d, stream);
        cuda::launch(wgrad_mix_kernel<scalar_t, dz_t>, cuda::capped_grid(items, kThreads), kThreads, 0, stream, xp,
                     dz, partial.data_ptr<float>(), N, static_cast<int>(H), static_cast<int>(d), mrows, mchunks);
        if (m.defined()) {  // dm[k, g] = Σ_n dz[n, g, k]: column sums in (g, k) order, then transposed
          at::Tensor dm_gk = at::empty({H, d}, x.options());
          column_sums(dz, dm_gk.data_ptr<scalar_t>(), N, D, x, stream);
          dm.copy_(dm_gk.t());
        }
      };
      if (block) mix_grads(static_cast<const float*>(dzf.data_ptr<float>()));
      else mix_grads(gp);
      launch_reduce(partial, dM.data_ptr<scalar_t>(), D * H, mchunks, stream);
    }
    if (block) {
      // dA from z (the mix of x, recomputed in float, or x itself) and dy; da = column sums of dy.
      const int64_t P = H * d * d;
      const int64_t brows = chunk_rows_for(N, P, 64), bchunks = (N + brows - 1) / brows;
      at::Tensor partial = at::empty({bchunks, P}, fopt);
      const int64_t tiles = (d + kWT - 1) / kWT, items = bchunks * H * tiles * tiles;
      if (mix) {
        at::Tensor zf = at::empty({N, D}, fopt);
        launch_mix<false>(xp, Mp, opt_ptr<scalar_t>(m), zf.data_ptr<float>(), N, H, d, stream);
        cuda::launch(wgrad_block_kernel<float, scalar_t>, cuda::capped_grid(items, 1), kThreads, 0, stream,
                     zf.data_ptr<float>(), gp, partial.data_ptr<float>(), N, static_cast<int>(H), static_cast<int>(d),
                     brows, bchunks);
      } else {
        cuda::launch(wgrad_block_kernel<scalar_t, scalar_t>, cuda::capped_grid(items, 1), kThreads, 0, stream, xp,
                     gp, partial.data_ptr<float>(), N, static_cast<int>(H), static_cast<int>(d), brows, bchunks);
      }
      launch_reduce(partial, dA.data_ptr<scalar_t>(), P, bchunks, stream);
      if (a.defined()) column_sums(gp, da.data_ptr<scalar_t>(), N, D, x, stream);
    }
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CUDA, m) {
  m.impl("hsim_split_linear", &hsim_split_linear_cuda);
  m.impl("hsim_split_linear_backward", &hsim_split_linear_backward_cuda);
}

}  // namespace tntkernels

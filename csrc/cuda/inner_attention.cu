// Batched inner-block attention on CUDA: softmax(q kᵀ · scale) v over (S, H, m, d) sequences.
//
// Forward: one thread per query row (sequence × head × row on grid axis x, never y/z, so S·H far
// above 65,535 works); online softmax over the m keys, q_i and o_i in registers (head_dim ≤ 64).
// Backward, without atomics (deterministic):
//   kernel 1, one thread per query row i:  D_i = dO_i·O_i,  dQ_i = scale Σ_j P_ij (dO_i·v_j − D_i) k_j
//   kernel 2, one thread per key row j:    dV_j = Σ_i P_ij dO_i,  dK_j = scale Σ_i P_ij (dO_i·v_j − D_i) q_i
// with P_ij = exp(scale q_i·k_j − lse_i) recomputed from the forward's log-sum-exp.
// Accumulation in float for float16 / bfloat16 / float32, double for float64.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "tntkernels/cuda_utils.h"
#include "tntkernels/dispatch.h"
#include "tntkernels/inner_attention.h"
#include "tntkernels/limits.h"

namespace tntkernels {
namespace {

using limits::inner_attention_cuda::kMaxHeadDim;
using limits::inner_attention_cuda::kMaxRows;
using limits::inner_attention_cuda::kMaxTokens;

constexpr int kThreads = 128;
static_assert(kMaxRows == kMaxTokens * kThreads, "max_rows: at most 2^31 - 1 blocks of kThreads rows");

// Loads row `row` (length n ≤ DMAX) of a row-major matrix into registers, zero-padded.
template <int DMAX, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ src, int n, acc_t (&dst)[DMAX]) {
#pragma unroll
  for (int c = 0; c < DMAX; ++c) dst[c] = c < n ? static_cast<acc_t>(src[c]) : acc_t(0);
}

template <int DMAX, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_row(const acc_t (&a)[DMAX], const scalar_t* __restrict__ b, int n) {
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < DMAX; ++c)
    if (c < n) s += a[c] * static_cast<acc_t>(b[c]);
  return s;
}

template <typename scalar_t, int DMAX>
__global__ void inner_attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                           const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                           at::opmath_type<scalar_t>* __restrict__ lse, int64_t rows, int m, int d,
                                           int dv, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = cuda::global_thread_index();  // (pair, i)
  if (row >= rows) return;
  const int64_t pair = row / m;
  acc_t qi[DMAX], o[DMAX];
  load_row<DMAX>(q + row * d, d, qi);
#pragma unroll
  for (int c = 0; c < DMAX; ++c) o[c] = 0;
  const scalar_t* kp = k + pair * m * d;
  const scalar_t* vp = v + pair * m * dv;
  acc_t mx = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  for (int j = 0; j < m; ++j) {
    const acc_t s = dot_row<DMAX>(qi, kp + j * d, d) * scale;
    const acc_t mx_new = s > mx ? s : mx;
    // While every logit so far is −inf, shift by 0 instead of mx_new: exp(−inf − (−inf)) would be NaN
    // (a −inf first key poisoned the row); this way corr = p = 0 until a finite logit arrives.
    const acc_t shift = mx_new == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx_new;
    const acc_t corr = exp(mx - shift);
    const acc_t p = exp(s - shift);
    sum = sum * corr + p;
#pragma unroll
    for (int c = 0; c < DMAX; ++c)
      if (c < dv) o[c] = o[c] * corr + p * static_cast<acc_t>(vp[j * dv + c]);
    mx = mx_new;
  }
  const acc_t inv = acc_t(1) / sum;
#pragma unroll
  for (int c = 0; c < DMAX; ++c)
    if (c < dv) out[row * dv + c] = static_cast<scalar_t>(o[c] * inv);
  lse[row] = mx + log(sum);
}

template <typename scalar_t, int DMAX>
__global__ void inner_attention_bwd_dq_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q,
                                              const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                              const scalar_t* __restrict__ out,
                                              const at::opmath_type<scalar_t>* __restrict__ lse,
                                              at::opmath_type<scalar_t>* __restrict__ delta, scalar_t* __restrict__ dq,
                                              int64_t rows, int m, int d, int dv, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = cuda::global_thread_index();  // (pair, i)
  if (row >= rows) return;
  const int64_t pair = row / m;
  acc_t qi[DMAX], gi[DMAX], dqi[DMAX];
  load_row<DMAX>(q + row * d, d, qi);
  load_row<DMAX>(dout + row * dv, dv, gi);
  const acc_t Di = dot_row<DMAX>(gi, out + row * dv, dv);
  const acc_t lse_i = lse[row];
#pragma unroll
  for (int c = 0; c < DMAX; ++c) dqi[c] = 0;
  const scalar_t* kp = k + pair * m * d;
  const scalar_t* vp = v + pair * m * dv;
  for (int j = 0; j < m; ++j) {
    const acc_t p = exp(dot_row<DMAX>(qi, kp + j * d, d) * scale - lse_i);
    const acc_t ds = p * (dot_row<DMAX>(gi, vp + j * dv, dv) - Di) * scale;
#pragma unroll
    for (int c = 0; c < DMAX; ++c)
      if (c < d) dqi[c] += ds * static_cast<acc_t>(kp[j * d + c]);
  }
#pragma unroll
  for (int c = 0; c < DMAX; ++c)
    if (c < d) dq[row * d + c] = static_cast<scalar_t>(dqi[c]);
  delta[row] = Di;
}

template <typename scalar_t, int DMAX>
__global__ void inner_attention_bwd_dkdv_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q,
                                                const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                                const at::opmath_type<scalar_t>* __restrict__ lse,
                                                const at::opmath_type<scalar_t>* __restrict__ delta,
                                                scalar_t* __restrict__ dk, scalar_t* __restrict__ dv_out, int64_t rows,
                                                int m, int d, int dv, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = cuda::global_thread_index();  // (pair, j)
  if (row >= rows) return;
  const int64_t pair = row / m;
  acc_t kj[DMAX], vj[DMAX], dkj[DMAX], dvj[DMAX];
  load_row<DMAX>(k + row * d, d, kj);
  load_row<DMAX>(v + row * dv, dv, vj);
#pragma unroll
  for (int c = 0; c < DMAX; ++c) dkj[c] = dvj[c] = 0;
  const scalar_t* qp = q + pair * m * d;
  const scalar_t* gp = dout + pair * m * dv;
  for (int i = 0; i < m; ++i) {
    const int64_t r = pair * m + i;
    const acc_t p = exp(dot_row<DMAX>(kj, qp + i * d, d) * scale - lse[r]);
    const acc_t ds = p * (dot_row<DMAX>(vj, gp + i * dv, dv) - delta[r]) * scale;
#pragma unroll
    for (int c = 0; c < DMAX; ++c) {
      if (c < d) dkj[c] += ds * static_cast<acc_t>(qp[i * d + c]);
      if (c < dv) dvj[c] += p * static_cast<acc_t>(gp[i * dv + c]);
    }
  }
#pragma unroll
  for (int c = 0; c < DMAX; ++c) {
    if (c < d) dk[row * d + c] = static_cast<scalar_t>(dkj[c]);
    if (c < dv) dv_out[row * dv + c] = static_cast<scalar_t>(dvj[c]);
  }
}

// Calls f(std::integral_constant<int, DMAX>) with the smallest DMAX in {8, 16, 32, kMaxHeadDim} holding n
// (n <= kMaxHeadDim, checked before).
static_assert(kMaxHeadDim >= 32, "dispatch_head_dim's last case is kMaxHeadDim");
template <typename F>
void dispatch_head_dim(int64_t n, F&& f) {
  if (n <= 8) f(std::integral_constant<int, 8>{});
  else if (n <= 16) f(std::integral_constant<int, 16>{});
  else if (n <= 32) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, kMaxHeadDim>{});
}

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "inner_attention (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim,
              "inner_attention (CUDA): head_dim d and dv must be <= ", kMaxHeadDim, ", got d=", q.size(3),
              ", dv=", v.size(3));
  TORCH_CHECK(q.size(2) <= kMaxTokens, "inner_attention (CUDA): m too large");
}

// One thread per row, no grid-stride loop: the grid holds every row.
unsigned int num_blocks(int64_t rows) {
  TORCH_CHECK(rows <= kMaxRows, "inner_attention (CUDA): too many rows (", rows, ")");
  return static_cast<unsigned int>(cuda::ceil_div(rows, kThreads));
}

std::tuple<at::Tensor, at::Tensor> inner_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale) {
  check_inner_attention_inputs(q_in, k_in, v_in);
  check_cuda_inputs(q_in, v_in);
  const cuda::DeviceScope scope(q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t S = q.size(0), H = q.size(1), m = q.size(2), d = q.size(3), dv = v.size(3);
  at::Tensor out = at::empty({S, H, m, dv}, q.options());
  at::Tensor lse = at::empty({S, H, m}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const int64_t rows = S * H * m;
  if (rows == 0) return {out, lse};
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "inner_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_head_dim(std::max(d, dv), [&](auto dmax) {
      cuda::launch(inner_attention_fwd_kernel<scalar_t, decltype(dmax)::value>, num_blocks(rows), kThreads, 0,
                   scope.stream(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                   out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), rows, static_cast<int>(m), static_cast<int>(d),
                   static_cast<int>(dv), static_cast<acc_t>(scale));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_inner_attention_backward_inputs(grad_out_in, q_in, k_in, v_in, out_in, lse_in);
  check_cuda_inputs(q_in, v_in);
  const cuda::DeviceScope scope(q_in);
  const at::Tensor g = grad_out_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v = v_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const int64_t S = q.size(0), H = q.size(1), m = q.size(2), d = q.size(3), dv = v.size(3);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dvt = at::empty_like(v);
  const int64_t rows = S * H * m;
  if (rows == 0) return {dq, dk, dvt};
  at::Tensor delta = at::empty_like(lse);
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "inner_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_head_dim(std::max(d, dv), [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      const unsigned int grid = num_blocks(rows);
      cuda::launch(inner_attention_bwd_dq_kernel<scalar_t, DMAX>, grid, kThreads, 0, scope.stream(),
                   g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                   out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(),
                   rows, static_cast<int>(m), static_cast<int>(d), static_cast<int>(dv), static_cast<acc_t>(scale));
      cuda::launch(inner_attention_bwd_dkdv_kernel<scalar_t, DMAX>, grid, kThreads, 0, scope.stream(),
                   g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                   lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(), dvt.data_ptr<scalar_t>(),
                   rows, static_cast<int>(m), static_cast<int>(d), static_cast<int>(dv), static_cast<acc_t>(scale));
    });
  });
  return {dq, dk, dvt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CUDA, m) {
  m.impl("inner_attention", &inner_attention_cuda);
  m.impl("inner_attention_backward", &inner_attention_backward_cuda);
}

}  // namespace tntkernels

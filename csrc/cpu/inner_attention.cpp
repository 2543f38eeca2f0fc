// Batched inner-block attention on CPU: softmax(q kᵀ · scale) v over (S, H, m, d) sequences.
//
// at::parallel_for over the S·H (sequence, head) pairs; every pair is independent and each output
// element is written by exactly one task, so results are deterministic. Accumulation in float
// for float16 / bfloat16 / float32 inputs, double for float64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace tntkernels {
namespace {

template <typename scalar_t>
void inner_attention_fwd_cpu_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                                    at::opmath_type<scalar_t>* lse_ptr, int64_t pairs, int64_t m, int64_t d,
                                    int64_t dv, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(m), o(dv);
    for (int64_t pair = begin; pair < end; ++pair) {
      const scalar_t* qp = q + pair * m * d;
      const scalar_t* kp = k + pair * m * d;
      const scalar_t* vp = v + pair * m * dv;
      for (int64_t i = 0; i < m; ++i) {
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < m; ++j) {
          acc_t s = 0;
          for (int64_t c = 0; c < d; ++c) s += acc_t(qp[i * d + c]) * acc_t(kp[j * d + c]);
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        acc_t sum = 0;
        for (int64_t j = 0; j < m; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t j = 0; j < m; ++j)
          for (int64_t c = 0; c < dv; ++c) o[c] += p[j] * acc_t(vp[j * dv + c]);
        const acc_t inv = acc_t(1) / sum;
        for (int64_t c = 0; c < dv; ++c) out[(pair * m + i) * dv + c] = static_cast<scalar_t>(o[c] * inv);
        lse_ptr[pair * m + i] = mx + std::log(sum);
      }
    }
  });
}

template <typename scalar_t>
void inner_attention_bwd_cpu_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                    const scalar_t* out, const at::opmath_type<scalar_t>* lse, scalar_t* dq,
                                    scalar_t* dk, scalar_t* dv_ptr, int64_t pairs, int64_t m, int64_t d, int64_t dv,
                                    double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dq_acc(m * d), dk_acc(m * d), dv_acc(m * dv);
    for (int64_t pair = begin; pair < end; ++pair) {
      const scalar_t* qp = q + pair * m * d;
      const scalar_t* kp = k + pair * m * d;
      const scalar_t* vp = v + pair * m * dv;
      const scalar_t* op = out + pair * m * dv;
      const scalar_t* gp = dout + pair * m * dv;
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t i = 0; i < m; ++i) {
        // D_i = Σ_j P_ij dP_ij = dO_i · O_i
        acc_t Di = 0;
        for (int64_t c = 0; c < dv; ++c) Di += acc_t(gp[i * dv + c]) * acc_t(op[i * dv + c]);
        const acc_t lse_i = lse[pair * m + i];
        for (int64_t j = 0; j < m; ++j) {
          acc_t s = 0;
          for (int64_t c = 0; c < d; ++c) s += acc_t(qp[i * d + c]) * acc_t(kp[j * d + c]);
          const acc_t pij = std::exp(s * scale - lse_i);
          acc_t dpij = 0;
          for (int64_t c = 0; c < dv; ++c) {
            dpij += acc_t(gp[i * dv + c]) * acc_t(vp[j * dv + c]);
            dv_acc[j * dv + c] += pij * acc_t(gp[i * dv + c]);
          }
          const acc_t dsij = pij * (dpij - Di) * scale;
          for (int64_t c = 0; c < d; ++c) {
            dq_acc[i * d + c] += dsij * acc_t(kp[j * d + c]);
            dk_acc[j * d + c] += dsij * acc_t(qp[i * d + c]);
          }
        }
      }
      for (int64_t x = 0; x < m * d; ++x) {
        dq[pair * m * d + x] = static_cast<scalar_t>(dq_acc[x]);
        dk[pair * m * d + x] = static_cast<scalar_t>(dk_acc[x]);
      }
      for (int64_t x = 0; x < m * dv; ++x) dv_ptr[pair * m * dv + x] = static_cast<scalar_t>(dv_acc[x]);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "inner_attention_cpu", [&] {
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
  if (S * H * m == 0) return {dq.zero_(), dk.zero_(), dvt.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "inner_attention_backward_cpu", [&] {
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

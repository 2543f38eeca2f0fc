// Batched inner-block attention on CUDA: softmax(q kᵀ · scale) v over (S, H, m, d) sequences.
//
// Domain: the inner level of TNT / RTNT — very many short sequences with a small head_dim:
// m ≤ 64 tokens, d, dv ≤ 64 (limits.h; Python's fit check and check_cuda_inputs below refuse anything
// else with a clear error). A whole (sequence, head) pair lives in shared memory. Longer sequences
// (TNT's outer level: 197 or 577 tokens, head_dim 64) are FlashAttention's ground: nn/attention.py
// sends them to F.scaled_dot_product_attention.
//
// Operands. q, k (S, H, m, d); v and the upstream gradient gO (S, H, m, dv); the backward's out
// (S, H, m, dv) and lse (S, H, m) — all read through their strides: the permuted / unbound views of a
// qkv Linear output (timm's Attention) go in without a copy. Only a 4-D operand whose last dim is not
// unit-stride is copied (rows_unit_stride). Outputs (out, lse, dq, dk, dv) are allocated contiguous.
//
// Work split. A block takes G consecutive (sequence, head) pairs p = s·H + h — at most 256 rows (G·m)
// and about 32 KB of tiles (at least one pair), G a multiple of H when H ≤ G so that a block holds whole
// sequences — and walks p0 = blockIdx.x·G, (blockIdx.x + gridDim.x)·G, ... (the grid is capped,
// cuda::capped_grid). Inside a block, phases separated by __syncthreads, each a loop of the 256 threads
// over that phase's elements; r = g·m + i is a row of the block's tiles (pair p0 + g, token i):
//   load:     the pairs' tiles into shared memory, converted to acc_t;
//   forward:  [(r, j)] S = (q kᵀ)·scale;  [rows r] softmax in place, lse;  [(r, c)] out = P v;
//   backward: [rows r] D_r = gO_r·out_r;  [(r, j)] P = exp(S − lse);  [(r_j, c)] dV = Pᵀ gO;
//             [(r, j)] dS = P ⊙ (gO vᵀ − D)·scale, in place of P;  [(r, c)] dQ = dS k;  [(r_j, c)] dK = dSᵀ q.
// Every output element has exactly one writer and no atomics are used: results are deterministic and
// independent of the grid. Per-thread state is a few scalars (no per-thread arrays), so nothing spills.
//
// Access pattern.
//   Global loads (load_tile): consecutive threads take consecutive elements of the flattened tile with
//   the feature index c fastest (unit stride), then the head when heads are adjacent in memory
//   (stride_h < stride_i, e.g. the (B, N, 2, H, d) qk output permuted to (B, H, N, d): TNT-S q has
//   token stride 2·H·d = 48, head stride d = 6, so a warp reads runs of H·d = 24 contiguous elements,
//   one token of a sentence), else the token (contiguous (S, H, m, d): one run of G·m·d elements).
//   Global stores: every output is written in its memory order by consecutive threads (coalesced).
//   Shared memory: tiles are [r][col] with an odd row stride (n | 1 for 4-byte acc_t), so 32 threads
//   reading one column of 32 different rows hit 32 different banks. In the (r, j) phases consecutive
//   threads take consecutive j (distinct rows of k / v: conflict-free; P / dS: consecutive words) while
//   q / gO row r is shared (a broadcast); in the (r, c) phases consecutive c read consecutive words.
//
// Softmax: two passes over a row in shared memory, shifted by the row max — by 0 when every logit of
// the row is −inf, so exp never sees −inf − (−inf): a −inf logit anywhere among finite ones gets
// probability exactly 0 (the first key included). A row whose logits are all −inf (from an inf in the
// inputs, or q·k overflowing) has no softmax: sum 0, lse = −inf and a NaN output row, as the reference
// (torch.softmax) and the CPU op give; its backward is NaN too. NaN logits propagate.
// Accumulation in float for float16 / bfloat16 / float32, double for float64 (whose tiles are unpadded,
// so that m = d = dv = 64 fits an A100's 163 KB per block).
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <torch/library.h>

#include <algorithm>
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

constexpr int kThreads = 256;
constexpr int64_t kMaxBlockRows = kThreads;  // G·m: one softmax / D row per thread
constexpr int64_t kSmemTarget = 32 * 1024;   // bytes of tiles a block fills with pairs (at least one pair)
static_assert(kMaxTokens <= kMaxBlockRows, "a block holds at least one whole pair");
// Pair, row and in-block element indices are 32-bit: S·H·m < 2^31, G·m·max(m, d, dv) ≤ 256·64.
static_assert(kMaxRows <= std::numeric_limits<int32_t>::max(), "32-bit pair and row indices");

using Div = at::cuda::detail::IntDivider<unsigned int>;  // n / divisor by multiply-high and shift

// Element strides of an operand's leading dims (s, h, i): (S, H, m, n) with unit stride in n, or lse (S, H, m).
struct Strides {
  int64_t s, h, i;
};

// Shapes and shared-memory layout of one launch (the same for every block).
struct Geometry {
  int m, d, dv;       // tokens, head_dim of q / k, head_dim of v
  int G;              // pairs per block
  int ld, ldv, ldx;   // row strides (elements) of the q / k tiles, the v / gO tiles, the P tile (and out's)
  unsigned int pairs; // S·H
  int64_t blocks;     // ceil(pairs / G): work items of the block-stride loop
  Div div_H, div_m, div_d, div_dv, div_G;
};

// Offset of row i of pair p (s = p / H, h = p % H) in an operand with strides st.
__device__ __forceinline__ int64_t row_offset(const Strides& st, const Div& div_H, unsigned int p, unsigned int i) {
  const auto sh = div_H.divmod(p);
  return static_cast<int64_t>(sh.div) * st.s + static_cast<int64_t>(sh.mod) * st.h + static_cast<int64_t>(i) * st.i;
}

// dst[(g·m + i)·ld + c] = src[pair p0 + g, token i, column c] for g < gn, i < m, c < n, as acc_t. The flat
// index runs over (i, g, c) when the heads are adjacent in memory (st.h < st.i), else over (g, i, c); c is
// fastest either way, so consecutive threads read consecutive addresses (see the file comment).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, const Strides& st, const Geometry& geo,
                                          unsigned int p0, int gn, int n, const Div& div_n, int ld,
                                          acc_t* __restrict__ dst) {
  const unsigned int total = static_cast<unsigned int>(geo.G * geo.m * n);
  const bool heads_inner = st.h < st.i;
  for (unsigned int e = threadIdx.x; e < total; e += blockDim.x) {
    const auto rc = div_n.divmod(e);  // (row of the flat order, column)
    unsigned int g, i;
    if (heads_inner) {
      const auto ig = geo.div_G.divmod(rc.div);
      i = ig.div;
      g = ig.mod;
    } else {
      const auto gi = geo.div_m.divmod(rc.div);
      g = gi.div;
      i = gi.mod;
    }
    if (g < static_cast<unsigned int>(gn))
      dst[(g * geo.m + i) * ld + rc.mod] = static_cast<acc_t>(src[row_offset(st, geo.div_H, p0 + g, i) + rc.mod]);
  }
}

// Σ_c a[c]·b[c] over c < n, in order (the forward and the backward form S with this same code).
template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int n) {
  acc_t s = 0;
#pragma unroll 4
  for (int c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// Shared memory (acc_t elements): q, k tiles (G·m, ld); v tile (G·m, ldv); P tile (G·m, ldx).
template <typename acc_t>
int64_t fwd_smem_bytes(const Geometry& geo) {
  return static_cast<int64_t>(geo.G) * geo.m * (2 * geo.ld + geo.ldv + geo.ldx) * static_cast<int64_t>(sizeof(acc_t));
}

// Forward: out (S, H, m, dv) and lse (S, H, m), contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    inner_attention_fwd_kernel(const scalar_t* __restrict__ q, Strides sq, const scalar_t* __restrict__ k, Strides sk,
                               const scalar_t* __restrict__ v, Strides sv, scalar_t* __restrict__ out,
                               at::opmath_type<scalar_t>* __restrict__ lse, Geometry geo,
                               at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int m = geo.m, d = geo.d, dv = geo.dv, ld = geo.ld, ldv = geo.ldv, ldx = geo.ldx;
  const int tile = geo.G * m;  // rows of every tile
  acc_t* qs = reinterpret_cast<acc_t*>(smem);
  acc_t* ks = qs + tile * ld;
  acc_t* vs = ks + tile * ld;
  acc_t* ps = vs + tile * ldv;  // logits, then P
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  TNT_BLOCK_STRIDE_LOOP(blk, geo.blocks) {
    const unsigned int p0 = static_cast<unsigned int>(blk) * geo.G;  // < pairs < 2^31
    const int gn = min(geo.G, static_cast<int>(geo.pairs - p0));      // pairs in this step
    const unsigned int rows = gn * m;
    load_tile(q, sq, geo, p0, gn, d, geo.div_d, ld, qs);
    load_tile(k, sk, geo, p0, gn, d, geo.div_d, ld, ks);
    load_tile(v, sv, geo, p0, gn, dv, geo.div_dv, ldv, vs);
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < rows * m; e += blockDim.x) {  // (r, j): S_rj
      const auto rj = geo.div_m.divmod(e);
      const unsigned int r = rj.div, j = rj.mod;
      const unsigned int kr = r - geo.div_m.mod(r) + j;  // key j of r's pair
      ps[r * ldx + j] = dot(qs + r * ld, ks + kr * ld, d) * scale;
    }
    __syncthreads();
    for (unsigned int r = threadIdx.x; r < rows; r += blockDim.x) {  // softmax of row r, in place
      acc_t* s = ps + r * ldx;
      acc_t mx = -inf;
      for (int j = 0; j < m; ++j) mx = s[j] > mx ? s[j] : mx;
      const acc_t shift = mx == -inf ? acc_t(0) : mx;  // all −inf: exp(−inf − 0) = 0, not exp(NaN)
      acc_t sum = 0;
      for (int j = 0; j < m; ++j) {
        const acc_t p = exp(s[j] - shift);
        s[j] = p;
        sum += p;
      }
      const acc_t inv = acc_t(1) / sum;
      for (int j = 0; j < m; ++j) s[j] *= inv;
      lse[static_cast<int64_t>(p0) * m + r] = shift + log(sum);
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < rows * dv; e += blockDim.x) {  // (r, c): out = P v
      const auto rc = geo.div_dv.divmod(e);
      const unsigned int r = rc.div, c = rc.mod;
      const acc_t* p = ps + r * ldx;
      const acc_t* vc = vs + (r - geo.div_m.mod(r)) * ldv + c;  // column c of r's pair's v
      acc_t o = 0;
      for (int j = 0; j < m; ++j) o += p[j] * vc[j * ldv];
      out[static_cast<int64_t>(p0) * m * dv + e] = static_cast<scalar_t>(o);
    }
    __syncthreads();  // the next step's loads overwrite the tiles
  }
}

// Shared memory (acc_t elements): q, k tiles (G·m, ld); v, gO tiles (G·m, ldv); out, then P, then dS
// (G·m, ldx); lse and D (G·m).
template <typename acc_t>
int64_t bwd_smem_bytes(const Geometry& geo) {
  return static_cast<int64_t>(geo.G) * geo.m * (2 * geo.ld + 2 * geo.ldv + geo.ldx + 2) *
         static_cast<int64_t>(sizeof(acc_t));
}

// Backward: dq, dk (S, H, m, d) and dv (S, H, m, dv), contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) inner_attention_bwd_kernel(
    const scalar_t* __restrict__ gout, Strides sg, const scalar_t* __restrict__ q, Strides sq,
    const scalar_t* __restrict__ k, Strides sk, const scalar_t* __restrict__ v, Strides sv,
    const scalar_t* __restrict__ out, Strides so, const at::opmath_type<scalar_t>* __restrict__ lse, Strides sl,
    scalar_t* __restrict__ dq, scalar_t* __restrict__ dk, scalar_t* __restrict__ dvo, Geometry geo,
    at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int m = geo.m, d = geo.d, dv = geo.dv, ld = geo.ld, ldv = geo.ldv, ldx = geo.ldx;
  const int tile = geo.G * m;
  acc_t* qs = reinterpret_cast<acc_t*>(smem);
  acc_t* ks = qs + tile * ld;
  acc_t* vs = ks + tile * ld;
  acc_t* gs = vs + tile * ldv;
  acc_t* xs = gs + tile * ldv;  // out, then P, then dS
  acc_t* ls = xs + tile * ldx;  // lse
  acc_t* ds = ls + tile;        // D = rowsum(gO ⊙ out)
  TNT_BLOCK_STRIDE_LOOP(blk, geo.blocks) {
    const unsigned int p0 = static_cast<unsigned int>(blk) * geo.G;
    const int gn = min(geo.G, static_cast<int>(geo.pairs - p0));
    const unsigned int rows = gn * m;
    load_tile(q, sq, geo, p0, gn, d, geo.div_d, ld, qs);
    load_tile(k, sk, geo, p0, gn, d, geo.div_d, ld, ks);
    load_tile(v, sv, geo, p0, gn, dv, geo.div_dv, ldv, vs);
    load_tile(gout, sg, geo, p0, gn, dv, geo.div_dv, ldv, gs);
    load_tile(out, so, geo, p0, gn, dv, geo.div_dv, ldx, xs);
    for (unsigned int r = threadIdx.x; r < rows; r += blockDim.x) {
      const auto gi = geo.div_m.divmod(r);
      ls[r] = lse[row_offset(sl, geo.div_H, p0 + gi.div, gi.mod)];
    }
    __syncthreads();
    for (unsigned int r = threadIdx.x; r < rows; r += blockDim.x) ds[r] = dot(gs + r * ldv, xs + r * ldx, dv);
    __syncthreads();  // out is read; xs takes P
    for (unsigned int e = threadIdx.x; e < rows * m; e += blockDim.x) {  // (r, j): P_rj, as the forward's S
      const auto rj = geo.div_m.divmod(e);
      const unsigned int r = rj.div, j = rj.mod;
      const unsigned int kr = r - geo.div_m.mod(r) + j;
      xs[r * ldx + j] = exp(dot(qs + r * ld, ks + kr * ld, d) * scale - ls[r]);
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < rows * dv; e += blockDim.x) {  // (key row, c): dV = Pᵀ gO
      const auto rc = geo.div_dv.divmod(e);
      const unsigned int rk = rc.div, c = rc.mod;
      const unsigned int j = geo.div_m.mod(rk), base = rk - j;  // key j of the pair whose rows start at base
      const acc_t* pj = xs + base * ldx + j;
      const acc_t* gc = gs + base * ldv + c;
      acc_t acc = 0;
      for (int i = 0; i < m; ++i) acc += pj[i * ldx] * gc[i * ldv];
      dvo[static_cast<int64_t>(p0) * m * dv + e] = static_cast<scalar_t>(acc);
    }
    __syncthreads();  // P is read; xs takes dS
    for (unsigned int e = threadIdx.x; e < rows * m; e += blockDim.x) {  // (r, j): dS_rj
      const auto rj = geo.div_m.divmod(e);
      const unsigned int r = rj.div, j = rj.mod;
      const unsigned int vr = r - geo.div_m.mod(r) + j;
      const acc_t dp = dot(gs + r * ldv, vs + vr * ldv, dv);
      xs[r * ldx + j] = xs[r * ldx + j] * (dp - ds[r]) * scale;
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < rows * d; e += blockDim.x) {  // (r, c): dQ = dS k
      const auto rc = geo.div_d.divmod(e);
      const unsigned int r = rc.div, c = rc.mod;
      const acc_t* s = xs + r * ldx;
      const acc_t* kc = ks + (r - geo.div_m.mod(r)) * ld + c;
      acc_t acc = 0;
      for (int j = 0; j < m; ++j) acc += s[j] * kc[j * ld];
      dq[static_cast<int64_t>(p0) * m * d + e] = static_cast<scalar_t>(acc);
    }
    for (unsigned int e = threadIdx.x; e < rows * d; e += blockDim.x) {  // (key row, c): dK = dSᵀ q
      const auto rc = geo.div_d.divmod(e);
      const unsigned int rk = rc.div, c = rc.mod;
      const unsigned int j = geo.div_m.mod(rk), base = rk - j;
      const acc_t* sj = xs + base * ldx + j;
      const acc_t* qc = qs + base * ld + c;
      acc_t acc = 0;
      for (int i = 0; i < m; ++i) acc += sj[i * ldx] * qc[i * ld];
      dk[static_cast<int64_t>(p0) * m * d + e] = static_cast<scalar_t>(acc);
    }
    __syncthreads();  // the next step's loads overwrite the tiles
  }
}

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "inner_attention (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim,
              "inner_attention (CUDA): head_dim d and dv must be <= ", kMaxHeadDim, ", got d=", q.size(3),
              ", dv=", v.size(3));
  TORCH_CHECK(q.size(2) <= kMaxTokens, "inner_attention (CUDA): m (tokens per sequence) must be <= ", kMaxTokens,
              " (the kernels are built for TNT's inner level; longer sequences belong to "
              "scaled_dot_product_attention), got m=",
              q.size(2));
  const int64_t rows = q.size(0) * q.size(1) * q.size(2);
  TORCH_CHECK(rows <= kMaxRows, "inner_attention (CUDA): S·H·m must be <= ", kMaxRows, ", got ", rows);
}

// t when its rows are unit-stride (or hold at most one element), else a contiguous copy: the kernels
// read any strides of the leading dims but take each row's elements as consecutive.
at::Tensor rows_unit_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Row stride of a shared-memory tile of n columns: odd for 4-byte elements (conflict-free column reads),
// unpadded for double (gradcheck only; keeps m = d = dv = 64 within an A100's shared memory).
template <typename acc_t>
int padded(int64_t n) {
  return static_cast<int>(sizeof(acc_t) == 4 ? (n | 1) : n);
}

// The launch geometry of S·H pairs of m tokens, pairs per block from the bytes of one pair's tiles.
template <typename acc_t>
Geometry make_geometry(int64_t S, int64_t H, int64_t m, int64_t d, int64_t dv, bool backward) {
  Geometry geo;
  geo.m = static_cast<int>(m);
  geo.d = static_cast<int>(d);
  geo.dv = static_cast<int>(dv);
  geo.ld = padded<acc_t>(d);
  geo.ldv = padded<acc_t>(dv);
  geo.ldx = backward ? std::max(padded<acc_t>(m), geo.ldv) : padded<acc_t>(m);  // backward: out's tile first
  geo.G = 1;
  const int64_t per_pair = backward ? bwd_smem_bytes<acc_t>(geo) : fwd_smem_bytes<acc_t>(geo);
  const int64_t pairs = S * H;
  int64_t G = std::max<int64_t>(1, std::min(kMaxBlockRows / m, kSmemTarget / per_pair));
  if (G >= H) G = G / H * H;  // whole sequences: a block reads every head of its tokens
  G = std::min(G, pairs);
  geo.G = static_cast<int>(G);
  geo.pairs = static_cast<unsigned int>(pairs);
  geo.blocks = cuda::ceil_div(pairs, G);
  geo.div_H = Div(static_cast<unsigned int>(H));
  geo.div_m = Div(static_cast<unsigned int>(m));
  geo.div_d = Div(static_cast<unsigned int>(std::max<int64_t>(d, 1)));  // d = 0: never divided by
  geo.div_dv = Div(static_cast<unsigned int>(std::max<int64_t>(dv, 1)));
  geo.div_G = Div(static_cast<unsigned int>(G));
  return geo;
}

// Opts `kernel` in to `bytes` of dynamic shared memory, after checking the current device has them.
template <typename... Params>
void prepare_smem(void (*kernel)(Params...), int64_t bytes, const at::Tensor& q, const Geometry& geo) {
  const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= limit, "inner_attention (CUDA): m=", geo.m, ", d=", geo.d, ", dv=", geo.dv, " in ",
              q.scalar_type(), " need ", bytes, " bytes of shared memory per block; this device allows ", limit);
  cuda::allow_dynamic_smem(kernel, bytes);
}

std::tuple<at::Tensor, at::Tensor> inner_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale) {
  check_inner_attention_inputs(q_in, k_in, v_in);
  check_cuda_inputs(q_in, v_in);
  const cuda::DeviceScope scope(q_in);
  const at::Tensor q = rows_unit_stride(q_in), k = rows_unit_stride(k_in), v = rows_unit_stride(v_in);
  const int64_t S = q.size(0), H = q.size(1), m = q.size(2), d = q.size(3), dv = v.size(3);
  at::Tensor out = at::empty({S, H, m, dv}, q.options());
  at::Tensor lse = at::empty({S, H, m}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (S * H * m == 0) return {out, lse};
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "inner_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry geo = make_geometry<acc_t>(S, H, m, d, dv, /*backward=*/false);
    const int64_t smem = fwd_smem_bytes<acc_t>(geo);
    prepare_smem(inner_attention_fwd_kernel<scalar_t>, smem, q, geo);
    cuda::launch(inner_attention_fwd_kernel<scalar_t>, cuda::capped_grid(geo.blocks, 1), kThreads,
                 static_cast<size_t>(smem), scope.stream(), q.data_ptr<scalar_t>(), strides_of(q),
                 k.data_ptr<scalar_t>(), strides_of(k), v.data_ptr<scalar_t>(), strides_of(v),
                 out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), geo, static_cast<acc_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, double scale) {
  check_inner_attention_backward_inputs(grad_out_in, q_in, k_in, v_in, out_in, lse);
  check_cuda_inputs(q_in, v_in);
  const cuda::DeviceScope scope(q_in);
  const at::Tensor g = rows_unit_stride(grad_out_in), q = rows_unit_stride(q_in), k = rows_unit_stride(k_in),
                   v = rows_unit_stride(v_in), out = rows_unit_stride(out_in);
  const int64_t S = q.size(0), H = q.size(1), m = q.size(2), d = q.size(3), dv = v.size(3);
  // contiguous whatever the inputs' strides (the fake kernel promises so; empty_like would copy them)
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dvt = at::empty(v.sizes(), v.options());
  if (S * H * m == 0) return {dq, dk, dvt};
  TNT_DISPATCH_FLOAT_TYPES(q.scalar_type(), "inner_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry geo = make_geometry<acc_t>(S, H, m, d, dv, /*backward=*/true);
    const int64_t smem = bwd_smem_bytes<acc_t>(geo);
    prepare_smem(inner_attention_bwd_kernel<scalar_t>, smem, q, geo);
    cuda::launch(inner_attention_bwd_kernel<scalar_t>, cuda::capped_grid(geo.blocks, 1), kThreads,
                 static_cast<size_t>(smem), scope.stream(), g.data_ptr<scalar_t>(), strides_of(g),
                 q.data_ptr<scalar_t>(), strides_of(q), k.data_ptr<scalar_t>(), strides_of(k),
                 v.data_ptr<scalar_t>(), strides_of(v), out.data_ptr<scalar_t>(), strides_of(out),
                 lse.data_ptr<acc_t>(), strides_of(lse), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                 dvt.data_ptr<scalar_t>(), geo, static_cast<acc_t>(scale));
  });
  return {dq, dk, dvt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tntkernels, CUDA, m) {
  m.impl("inner_attention", &inner_attention_cuda);
  m.impl("inner_attention_backward", &inner_attention_backward_cuda);
}

}  // namespace tntkernels

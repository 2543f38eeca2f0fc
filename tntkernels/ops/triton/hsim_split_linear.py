"""Triton kernels for TinT's H_sim-split linear op (docs/tint.md §1).

On x (N, D), D = H·d, a row viewed as x[n, h, k]:

    mix:    z[n, g, k] = Σ_h x[n, h, k] · M[k, h, g] + m[k, g]       M (d, H, H), m (d, H)
    block:  y[n, g, :] = z[n, g, :] @ A[g] + a[g]                     A (H, d, d), a (H, d)

Kernels (all take any strides for x, y and the weights, so transposed weight views serve the
backward without copies):

- `_hsim_split_linear_block_kernel` (forward whenever the block part is present; also dz = dy · A[g]ᵀ): one program
  per (row tile, head g), heads fastest on the grid so the H programs reading one row tile of x run
  together and share it through L2. The mix is formed in the prologue of the head's GEMM, one
  (BLOCK_N × BLOCK_K) chunk of z at a time (Σ over the H source heads, fp32), then multiplied on
  tensor cores with A[g][k-chunk, :]; both biases enter in the epilogue and y[n, g, :] is written
  once. fp32 accumulation; fp32 inputs use IEEE fp32 unless the caller allows TF32
  (torch.backends.cuda.matmul.allow_tf32).
- `_hsim_split_linear_mix_kernel` (the mix alone: the mix-only forward, and dx = Σ_g dz[n, g, k] M[k, h, g] in the
  backward with WGRAD, which also writes per-row-tile partials of dM[k, h, g] = Σ_n x[n, h, k] ·
  dz[n, g, k] and dm[k, g] = Σ_n dz[n, g, k]).
- `_hsim_split_linear_wgrad_kernel`: dA[g] = Σ_n z[n, g, :]ᵀ dy[n, g, :] and da[g] = Σ_n dy[n, g, :] as
  per-row-split partials (z recomputed from x by the mix).
Partials are reduced with torch.sum afterwards: no atomics, bitwise deterministic for a given
shape. Backward = dz (block part) → dA / da (block part) → dx, dM, dm (mix part): 2–3 launches,
because dx needs dz of every head (one kernel would have to redo the block GEMM H times).

Supports float32, float16, bfloat16; any N; d ≤ 256 (tensor-core tiles of 64/128/256 columns, d a
multiple of 16 recommended); H ≤ 64. Block sizes are autotuned on GPU (key: D, H, mix or not,
BLOCK_J, precision) and fixed under TRITON_INTERPRET=1.

Custom ops:
    tntkernels::hsim_split_linear_triton(x, mix_weight?, mix_bias?, block_weight?, block_bias?) -> y
    tntkernels::hsim_split_linear_triton_backward(grad_y, x, ..., needs: bool[5]) -> [dx, dM, dm, dA, da]
(0-element tensors stand for absent parameters and for the gradients `needs` does not ask for: their
kernels do not run).
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.hsim_split_linear import hsim_split_linear_ref
from ._common import DTYPES, check_fits, device_guard

if _backend.triton_importable():
    import triton
    import triton.language as tl

MAX_HEAD_DIM = 256  # d
MAX_HEADS = 64  # H
_J_BLOCKS = (64, 128, 256)  # BLOCK_J: the whole head width d in one tile
BLOCK_K = 32  # contraction chunk of the block GEMM (>= 16 for 16-bit tl.dot)
MIX_BLOCK_N = 64  # rows per mix tile
MIX_BLOCK_K = 64  # coordinates per mix tile
WGRAD_BLOCK_N = 32  # rows per step of the weight-gradient reduction
_TUNE = ((32, 4), (64, 8))  # (BLOCK_N, num_warps) autotuned for _hsim_split_linear_block_kernel on GPU
_INTERPRET_TUNE = (32, 4)
_INTERPRET_SPLITS = 2  # row splits of the weight-gradient reduction under the interpreter


def block_j(d: int) -> int:
    """BLOCK_J for head width d: the smallest of 64 / 128 / 256 that holds d."""
    for bj in _J_BLOCKS:
        if d <= bj:
            return bj
    raise ValueError(f"hsim_split_linear: the 'triton' backend supports d <= {MAX_HEAD_DIM}, got d={d}")


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def triton_configs() -> dict[str, list[dict]]:
    """Every compilation the launchers can ask for, per kernel (constexprs + dtype + num_warps);
    the tests compile each for sm_80 / sm_90."""
    block, mix, wgrad = [], [], []
    for dtype in DTYPES:
        for bj in _J_BLOCKS:
            for precision in _precisions(dtype):
                for has_mix in (0, 1):
                    for bn, warps in _TUNE:
                        block.append(dict(dtype=dtype, num_warps=warps, HAS_MIX=has_mix, BLOCK_N=bn, BLOCK_K=BLOCK_K,
                                          BLOCK_J=bj, PRECISION=precision))
                    wgrad.append(dict(dtype=dtype, num_warps=8 if bj == 256 else 4, HAS_MIX=has_mix,
                                      BLOCK_N=WGRAD_BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_J=bj, PRECISION=precision))
        for wg in (0, 1):
            mix.append(dict(dtype=dtype, num_warps=4, WGRAD=wg, BLOCK_N=MIX_BLOCK_N, BLOCK_K=MIX_BLOCK_K))
    return {"_hsim_split_linear_block_kernel": block, "_hsim_split_linear_mix_kernel": mix, "_hsim_split_linear_wgrad_kernel": wgrad}


def unsupported(x: torch.Tensor, H: int, d: int) -> str | None:
    """None when the kernels cover x (..., H·d) with H heads of width d, else what they do not cover."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (supported: float32, float16 and bfloat16)"
    if not (1 <= d <= MAX_HEAD_DIM and 1 <= H <= MAX_HEADS):
        return f"d={d}, H={H} (supported: 1 <= d <= {MAX_HEAD_DIM} and 1 <= H <= {MAX_HEADS})"
    return None


def _check(x: torch.Tensor, H: int, d: int) -> None:
    check_fits("hsim_split_linear", unsupported(x, H, d))


if _backend.triton_importable():
    @triton.jit
    def _mix_chunk(X, M, MB, rows, ks, g, N, H, d, sx_n, sm_k, sm_h, sm_g, smb_k, smb_g, has_mb,
                   HAS_MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """z[rows, g, ks] in fp32: Σ_h x[rows, h, ks] M[ks, h, g] + m[ks, g] (HAS_MIX), else x[rows, g, ks]."""
        r_ok = rows[:, None] < N
        k_ok = ks < d
        if HAS_MIX:
            z = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for h in range(H):
                xh = tl.load(X + rows[:, None] * sx_n + (h * d + ks)[None, :], mask=r_ok & k_ok[None, :], other=0.0)
                mh = tl.load(M + ks * sm_k + h * sm_h + g * sm_g, mask=k_ok, other=0.0)
                z += xh.to(tl.float32) * mh.to(tl.float32)[None, :]
            mb = tl.load(MB + ks * smb_k + g * smb_g, mask=k_ok & ((ks * 0 + has_mb) != 0), other=0.0)
            z += mb.to(tl.float32)[None, :]
        else:
            z = tl.load(X + rows[:, None] * sx_n + (g * d + ks)[None, :], mask=r_ok & k_ok[None, :],
                        other=0.0).to(tl.float32)
        return z

    @triton.jit
    def _hsim_split_linear_block_kernel(
        X, M, MB, A, AB, Y,
        sx_n, sm_k, sm_h, sm_g, smb_k, smb_g, sa_g, sa_k, sa_j, sab_g, sab_j, sy_n,
        N, D, H, d, has_mb, has_ab,
        HAS_MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """y[n, g, :] = z[n, g, :] @ A[g] + a[g] for one (row tile, head g); z = mix(x) or x."""
        pid = tl.program_id(0)
        g = pid % H
        rows = (pid // H).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        js = tl.arange(0, BLOCK_J)
        j_ok = js < d
        acc = tl.zeros((BLOCK_N, BLOCK_J), tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            z = _mix_chunk(X, M, MB, rows, ks, g, N, H, d, sx_n, sm_k, sm_h, sm_g, smb_k, smb_g, has_mb, HAS_MIX,
                           BLOCK_N, BLOCK_K)
            a = tl.load(A + g * sa_g + ks[:, None] * sa_k + js[None, :] * sa_j,
                        mask=(ks[:, None] < d) & j_ok[None, :], other=0.0)
            acc += tl.dot(z.to(a.dtype), a, input_precision=PRECISION)
        ab = tl.load(AB + g * sab_g + js * sab_j, mask=j_ok & ((js * 0 + has_ab) != 0), other=0.0)
        acc += ab.to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * sy_n + (g * d + js)[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rows[:, None] < N) & j_ok[None, :])

    @triton.jit
    def _hsim_split_linear_mix_kernel(
        X, M, MB, Y, X0, dMp, dmp,
        sx_n, sm_k, sm_h, sm_g, smb_k, smb_g, sy_n, sx0_n,
        N, H, d, has_mb,
        WGRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Per (row tile, head g, k-chunk): y[n, g, k] = Σ_h x[n, h, k] M[k, h, g] (+ m[k, g]).

        With WGRAD (the backward: X = dz, M = Mᵀ viewed by strides, X0 = the forward input x) the program's
        output head g is the source head of the forward and the loop head h its output head; it also
        writes dMp[tile, k, g, h] = Σ_{n in tile} x[n, g, k] · dz[n, h, k] and, for g = 0,
        dmp[tile, k, h] = Σ_{n in tile} dz[n, h, k]."""
        pid = tl.program_id(0)
        n_k = tl.cdiv(d, BLOCK_K)
        kb = pid % n_k
        g = (pid // n_k) % H
        tile = pid // (n_k * H)
        rows = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        r_ok = rows[:, None] < N
        k_ok = ks < d
        if WGRAD:
            x0 = tl.load(X0 + rows[:, None] * sx0_n + (g * d + ks)[None, :], mask=r_ok & k_ok[None, :],
                         other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for h in range(H):
            xh = tl.load(X + rows[:, None] * sx_n + (h * d + ks)[None, :], mask=r_ok & k_ok[None, :],
                         other=0.0).to(tl.float32)
            mh = tl.load(M + ks * sm_k + h * sm_h + g * sm_g, mask=k_ok, other=0.0)
            acc += xh * mh.to(tl.float32)[None, :]
            if WGRAD:
                base = tile.to(tl.int64) * d * H * H
                tl.store(dMp + base + ks * H * H + g * H + h, tl.sum(x0 * xh, axis=0), mask=k_ok)
                if g == 0:
                    tl.store(dmp + tile.to(tl.int64) * d * H + ks * H + h, tl.sum(xh, axis=0), mask=k_ok)
        mb = tl.load(MB + ks * smb_k + g * smb_g, mask=k_ok & ((ks * 0 + has_mb) != 0), other=0.0)
        acc += mb.to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * sy_n + (g * d + ks)[None, :], acc.to(Y.dtype.element_ty),
                 mask=r_ok & k_ok[None, :])

    @triton.jit
    def _hsim_split_linear_wgrad_kernel(
        X, M, MB, DY, dAp, dap,
        sx_n, sm_k, sm_h, sm_g, smb_k, smb_g, sdy_n,
        N, H, d, has_mb, rows_per_split,
        HAS_MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Per (row split, head g, k-chunk): dAp[split, g, k-chunk, :] = Σ_{n in split} z[n, g, k]ᵀ dy[n, g, :];
        for the first k-chunk also dap[split, g, :] = Σ_{n in split} dy[n, g, :]."""
        pid = tl.program_id(0)
        n_k = tl.cdiv(d, BLOCK_K)
        kb = pid % n_k
        g = (pid // n_k) % H
        split = pid // (n_k * H)
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        js = tl.arange(0, BLOCK_J)
        j_ok = js < d
        acc = tl.zeros((BLOCK_K, BLOCK_J), tl.float32)
        acc_b = tl.zeros((BLOCK_J,), tl.float32)
        start = split.to(tl.int64) * rows_per_split
        for n0 in range(0, rows_per_split, BLOCK_N):
            rows = start + n0 + tl.arange(0, BLOCK_N)
            rows = tl.where(n0 + tl.arange(0, BLOCK_N) < rows_per_split, rows, N)  # past the split: masked
            z = _mix_chunk(X, M, MB, rows, ks, g, N, H, d, sx_n, sm_k, sm_h, sm_g, smb_k, smb_g, has_mb, HAS_MIX,
                           BLOCK_N, BLOCK_K)
            z = tl.where(rows[:, None] < N, z, 0.0)  # the mix bias must not enter padded rows
            dy = tl.load(DY + rows[:, None] * sdy_n + (g * d + js)[None, :], mask=(rows[:, None] < N) & j_ok[None, :],
                         other=0.0)
            acc += tl.dot(tl.trans(z.to(dy.dtype)), dy, input_precision=PRECISION)
            acc_b += tl.sum(dy.to(tl.float32), axis=0)
        base = (split.to(tl.int64) * H + g) * d
        tl.store(dAp + (base + ks[:, None]) * d + js[None, :], acc, mask=(ks[:, None] < d) & j_ok[None, :])
        if kb == 0:
            tl.store(dap + base + js, acc_b, mask=j_ok)

    _hsim_split_linear_block_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in _TUNE],
        key=["D", "H", "HAS_MIX", "BLOCK_J", "PRECISION"])(_hsim_split_linear_block_kernel)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _w(t: torch.Tensor | None, like: torch.Tensor, ndim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(tensor, strides) of an optional weight; a dummy pointer and zero strides when absent."""
    if t is None:
        return like, (0,) * ndim
    return t, tuple(t.stride())


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (N, D) with unit stride along D (a copy only when the last dim is strided)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def _launch_block(x2, M, m, A, a, y2, H, d, precision):
    """y2 = Block(Mix(x2)) (Mix skipped when M is None) with _hsim_split_linear_block_kernel."""
    N, D = x2.shape
    Mt, sm = _w(M, x2, 3)
    mt, smb = _w(m, x2, 2)
    at, sab = _w(a, x2, 2)
    args = (x2, Mt, mt, A, at, y2, x2.stride(0), *sm, *smb, *A.stride(), *sab, y2.stride(0),
            N, D, H, d, int(m is not None), int(a is not None))
    meta = dict(HAS_MIX=int(M is not None), BLOCK_K=BLOCK_K, BLOCK_J=block_j(d), PRECISION=precision)
    if _backend.triton_interpret():
        bn, warps = _INTERPRET_TUNE
        _hsim_split_linear_block_kernel[(triton.cdiv(N, bn) * H,)](*args, BLOCK_N=bn, num_warps=warps, **meta)
    else:
        _hsim_split_linear_block_kernel_tuned[lambda opt: (triton.cdiv(N, opt["BLOCK_N"]) * H,)](*args, **meta)


def _launch_mix(x2, M, m, y2, H, d, dz_partner=None):
    """y2 = Mix(x2) with _hsim_split_linear_mix_kernel; with dz_partner (the backward: x2 = dz, M = Mᵀ view) also
    returns the per-tile partials (dMp (tiles, d, H, H), dmp (tiles, d, H)) in fp32."""
    N = x2.shape[0]
    tiles = triton.cdiv(N, MIX_BLOCK_N)
    wgrad = dz_partner is not None
    mt, smb = _w(m, x2, 2)
    if wgrad:
        dMp = x2.new_empty((tiles, d, H, H), dtype=torch.float32)
        dmp = x2.new_empty((tiles, d, H), dtype=torch.float32)
        partner = dz_partner
    else:
        dMp = dmp = partner = x2
    grid = (tiles * H * triton.cdiv(d, MIX_BLOCK_K),)
    _hsim_split_linear_mix_kernel[grid](x2, M, mt, y2, partner, dMp, dmp, x2.stride(0), *M.stride(), *smb, y2.stride(0),
                      partner.stride(0), N, H, d, int(m is not None), WGRAD=int(wgrad), BLOCK_N=MIX_BLOCK_N,
                      BLOCK_K=MIX_BLOCK_K, num_warps=4)
    return (dMp, dmp) if wgrad else None


def _splits(N: int, H: int, d: int, device: torch.device) -> int:
    if _backend.triton_interpret():
        return max(1, min(_INTERPRET_SPLITS, N))
    programs = H * triton.cdiv(d, BLOCK_K)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(N, 256)))


def hsim_split_linear_forward(x, M, m, A, a):
    """Triton forward: x (..., D), weights as `hsim_split_linear_ref` (either part None, not both).
    Returns y (..., D) contiguous, x's dtype."""
    H, d = (M.shape[1], M.shape[0]) if M is not None else (A.shape[0], A.shape[1])
    _check(x, H, d)
    x2 = _rows(x)
    y2 = x2.new_empty(x2.shape)
    if x2.shape[0] > 0:
        if A is not None:
            _launch_block(x2, M, m, A, a, y2, H, d, _precision(x.dtype))
        else:
            _launch_mix(x2, M, m, y2, H, d)
    return y2.reshape(x.shape)


def hsim_split_linear_backward(grad_y, x, M, m, A, a, needs=(True,) * 5):
    """Triton backward: (dx, dM, dm, dA, da) with None for absent parameters and for the gradients
    `needs` (one flag per input: x, M, m, A, a) does not ask for, whose kernels are skipped; dx in
    x's dtype, the parameter gradients in their dtypes (reduced in fp32). Deterministic: no atomics."""
    H, d = (M.shape[1], M.shape[0]) if M is not None else (A.shape[0], A.shape[1])
    _check(x, H, d)
    need_x, need_M, need_m, need_A, need_a = (bool(n) for n in needs)
    need_M, need_m = need_M and M is not None, need_m and m is not None
    need_A, need_a = need_A and A is not None, need_a and a is not None
    x2 = _rows(x)
    dy = _rows(grad_y.to(x.dtype))
    N = x2.shape[0]
    precision = _precision(x.dtype)
    dx = dM = dm = dA = da = None
    need_dz = need_x or need_M or need_m  # dz feeds dx and, through the mix, dM and dm
    if A is not None:
        dz = None
        if need_dz:
            dz = x2.new_empty(x2.shape)  # dz[n, g, :] = dy[n, g, :] @ A[g]ᵀ: the block kernel with Aᵀ, no mix
            if N > 0:
                _launch_block(dy, None, None, A.transpose(1, 2), None, dz, H, d, precision)
        if need_A or need_a:
            splits = _splits(N, H, d, x.device) if N > 0 else 1
            dAp = x2.new_zeros((splits, H, d, d), dtype=torch.float32)
            dap = x2.new_zeros((splits, H, d), dtype=torch.float32)
            if N > 0:
                Mt, sm = _w(M, x2, 3)
                mt, smb = _w(m, x2, 2)
                rows_per_split = triton.cdiv(N, splits)
                bj = block_j(d)
                _hsim_split_linear_wgrad_kernel[(splits * H * triton.cdiv(d, BLOCK_K),)](
                    x2, Mt, mt, dy, dAp, dap, x2.stride(0), *sm, *smb, dy.stride(0), N, H, d, int(m is not None),
                    rows_per_split, HAS_MIX=int(M is not None), BLOCK_N=WGRAD_BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_J=bj,
                    PRECISION=precision, num_warps=8 if bj == 256 else 4)
            dA = dAp.sum(0).to(A.dtype) if need_A else None
            da = dap.sum(0).to(a.dtype) if need_a else None
    else:
        dz = dy
    if M is None:
        return (dz.reshape(x.shape) if need_x else None), dM, dm, dA, da
    if not need_dz:
        return dx, dM, dm, dA, da
    dx = x2.new_empty(x2.shape)
    if N == 0:
        dM = torch.zeros_like(M)
        dm_full = torch.zeros(M.shape[:2], device=x.device, dtype=torch.float32)
    elif need_M or need_m:
        dMp, dmp = _launch_mix(dz, M.transpose(1, 2), None, dx, H, d, dz_partner=x2)
        dM = dMp.sum(0).to(M.dtype)
        dm_full = dmp.sum(0)
    else:  # dx alone: the mix kernel without its weight-gradient partials
        _launch_mix(dz, M.transpose(1, 2), None, dx, H, d)
        dm_full = None
    dm = dm_full.to(m.dtype) if need_m else None
    return (dx.reshape(x.shape) if need_x else None), (dM if need_M else None), dm, dA, da


# ---------------------------------------------------------------------------------------------
# Custom ops (+ fake kernels, autograd)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tntkernels::hsim_split_linear_triton", mutates_args=())
def _hsim_split_triton_op(x: torch.Tensor, mix_weight: torch.Tensor | None, mix_bias: torch.Tensor | None,
                          block_weight: torch.Tensor | None, block_bias: torch.Tensor | None) -> torch.Tensor:
    with device_guard(x):
        return hsim_split_linear_forward(x, mix_weight, mix_bias, block_weight, block_bias)


@_hsim_split_triton_op.register_fake
def _hsim_split_triton_fake(x, mix_weight, mix_bias, block_weight, block_bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("tntkernels::hsim_split_linear_triton_backward", mutates_args=())
def _hsim_split_triton_backward_op(
        grad_y: torch.Tensor, x: torch.Tensor, mix_weight: torch.Tensor | None, mix_bias: torch.Tensor | None,
        block_weight: torch.Tensor | None, block_bias: torch.Tensor | None, needs: list[bool]) -> list[torch.Tensor]:
    with device_guard(x):
        grads = hsim_split_linear_backward(grad_y, x, mix_weight, mix_bias, block_weight, block_bias, needs)
    return [g if g is not None else x.new_empty((0,)) for g in grads]  # 0-element: absent or not asked for


@_hsim_split_triton_backward_op.register_fake
def _hsim_split_triton_backward_fake(grad_y, x, mix_weight, mix_bias, block_weight, block_bias, needs):
    return [t.new_empty(t.shape) if t is not None and need else x.new_empty((0,))
            for t, need in zip((x, mix_weight, mix_bias, block_weight, block_bias), needs)]


def _backward(inputs, outputs, grads, needs):
    x, *params = inputs
    res = _hsim_split_triton_backward_op(grads[0].contiguous(), x, *params, [bool(n) for n in needs])
    return tuple(g if t is not None and n else None for g, t, n in zip(res, inputs, needs))


register_kernel_autograd(_hsim_split_triton_op, reference=hsim_split_linear_ref, backward=_backward)


def hsim_split_linear(x, mix_weight, mix_bias, block_weight, block_bias) -> torch.Tensor:
    """The Triton op (inputs checked by `tntkernels.hsim_split_linear`); both parts None is the identity."""
    if mix_weight is None and block_weight is None:
        return x.reshape(x.shape)  # both parts skipped: the identity, as the reference
    return _hsim_split_triton_op(x, mix_weight, mix_bias, block_weight, block_bias)

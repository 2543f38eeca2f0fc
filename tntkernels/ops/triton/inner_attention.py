"""Triton kernels for batched inner attention (TNT's word-level attention), and their custom ops.

Each program owns PAIRS_PER_PROG whole (sequence, head) pairs: the m×m logits tile lives in
registers, (sequence × head) runs on grid axis 0 only (no 65,535 limit), and the backward has no
atomics. Any strides (permuted qk / v views, no copy); m, d, dv 1–64 padded to 16/32/64 tiles;
fp32 (IEEE, no TF32) / fp16 / bf16 with an fp32 softmax.

Custom ops (same (out, lse) contract as the compiled `tntkernels::inner_attention`):
    tntkernels::inner_attention_triton(q, k, v, scale) -> (out, lse)
    tntkernels::inner_attention_triton_backward(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.inner_attention import inner_attention_ref
from ._common import DTYPES, check_fits, device_guard, next_pow2

if _backend.triton_importable():
    import triton
    import triton.language as tl

    from ._common import dot_ieee, load_tile

MAX_TOKENS = 64  # m: the whole m×m logits tile sits in registers
MAX_HEAD_DIM = 64  # d and dv
_BLOCKS = (16, 32, 64)  # tl.dot needs K >= 16 for 16-bit inputs on NVIDIA GPUs


def _launch_params(block_m: int, block_d: int, block_dv: int) -> tuple[int, int]:
    """(PAIRS_PER_PROG, num_warps) for one tile shape: several small pairs per program, wide tiles
    get more warps."""
    widest = max(block_d, block_dv)
    if block_m == 16:
        return (8 if widest == 16 else 4 if widest == 32 else 2), (2 if widest <= 32 else 4)
    if block_m == 32:
        return (2 if widest <= 32 else 1), 4
    return 1, (4 if widest <= 32 else 8)


def triton_config(m: int, d: int, dv: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_D, BLOCK_DV, PAIRS_PER_PROG, num_warps) the launchers use for m tokens,
    head_dim d (queries, keys) and dv (values)."""
    bm, bd, bdv = next_pow2(m), next_pow2(d), next_pow2(dv)
    return (bm, bd, bdv, *_launch_params(bm, bd, bdv))


def triton_configs() -> list[tuple[int, int, int, int, torch.dtype, int]]:
    """Every (BLOCK_M, BLOCK_D, BLOCK_DV, PAIRS_PER_PROG, dtype, num_warps) the launchers can choose
    for m, d, dv <= 64 (both kernels use the same set)."""
    configs = []
    for bm in _BLOCKS:
        for bd in _BLOCKS:
            for bdv in _BLOCKS:
                pairs, warps = _launch_params(bm, bd, bdv)
                configs += [(bm, bd, bdv, pairs, dtype, warps) for dtype in DTYPES]
    return configs


def unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the kernels cover q (S, H, m, d) and v (S, H, m, dv), else what they do not cover."""
    m, d, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (supported: float32, float16 and bfloat16)"
    if not (1 <= m <= MAX_TOKENS and 1 <= d <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM):
        return (f"m={m}, d={d}, dv={dv} (supported: 1 <= m <= {MAX_TOKENS} and 1 <= d, dv <= "
                f"{MAX_HEAD_DIM})")
    return None


def _check(q: torch.Tensor, v: torch.Tensor) -> None:
    check_fits("inner_attention", unsupported(q, v))


if _backend.triton_importable():
    @triton.jit
    def _inner_attention_fwd_kernel(
        Q, K, V, Out, Lse,  # (S, H, m, d), (S, H, m, d), (S, H, m, dv), (S, H, m, dv), (S, H, m) fp32
        sq_s, sq_h, sq_m, sq_d, sk_s, sk_h, sk_m, sk_d, sv_s, sv_h, sv_m, sv_d,
        so_s, so_h, so_m, so_d, sl_s, sl_h, sl_m,
        n_pairs, H, M, D, DV, scale,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAIRS_PER_PROG: tl.constexpr,
    ):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < M
        qk_mask = row_ok[:, None] & (offs_d[None, :] < D)  # (BLOCK_M, BLOCK_D)
        v_mask = row_ok[:, None] & (offs_dv[None, :] < DV)  # (BLOCK_M, BLOCK_DV)
        first = tl.program_id(0).to(tl.int64) * PAIRS_PER_PROG
        for i in tl.static_range(PAIRS_PER_PROG):
            pair = first + i
            ok = (pair + 0 * offs_m) < n_pairs  # (BLOCK_M,): the last program may run past S·H
            s = pair // H
            h = pair % H
            q = load_tile(Q, s, h, sq_s, sq_h, sq_m, sq_d, offs_m, offs_d, qk_mask & ok[:, None])
            k = load_tile(K, s, h, sk_s, sk_h, sk_m, sk_d, offs_m, offs_d, qk_mask & ok[:, None])
            v = load_tile(V, s, h, sv_s, sv_h, sv_m, sv_d, offs_m, offs_dv, v_mask & ok[:, None])
            logits = dot_ieee(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_M) fp32
            logits = tl.where(row_ok[None, :], logits, float("-inf"))  # padded key columns
            row_max = tl.max(logits, axis=1)
            p = tl.exp(logits - row_max[:, None])
            denom = tl.sum(p, axis=1)
            out = dot_ieee(p.to(v.dtype), v) / denom[:, None]  # (BLOCK_M, BLOCK_DV)
            tl.store(Out + s * so_s + h * so_h + offs_m[:, None] * so_m + offs_dv[None, :] * so_d,
                     out.to(Out.dtype.element_ty), mask=v_mask & ok[:, None])
            tl.store(Lse + s * sl_s + h * sl_h + offs_m * sl_m, row_max + tl.log(denom), mask=row_ok & ok)

    @triton.jit
    def _inner_attention_bwd_kernel(
        dO, Q, K, V, O, Lse, dQ, dK, dV,
        sdo_s, sdo_h, sdo_m, sdo_d, sq_s, sq_h, sq_m, sq_d, sk_s, sk_h, sk_m, sk_d,
        sv_s, sv_h, sv_m, sv_d, so_s, so_h, so_m, so_d, sl_s, sl_h, sl_m,
        sdq_s, sdq_h, sdq_m, sdq_d, sdk_s, sdk_h, sdk_m, sdk_d, sdv_s, sdv_h, sdv_m, sdv_d,
        n_pairs, H, M, D, DV, scale,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAIRS_PER_PROG: tl.constexpr,
    ):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < M
        qk_mask = row_ok[:, None] & (offs_d[None, :] < D)
        v_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
        first = tl.program_id(0).to(tl.int64) * PAIRS_PER_PROG
        for i in tl.static_range(PAIRS_PER_PROG):
            pair = first + i
            ok = (pair + 0 * offs_m) < n_pairs  # (BLOCK_M,)
            s = pair // H
            h = pair % H
            q = load_tile(Q, s, h, sq_s, sq_h, sq_m, sq_d, offs_m, offs_d, qk_mask & ok[:, None])
            k = load_tile(K, s, h, sk_s, sk_h, sk_m, sk_d, offs_m, offs_d, qk_mask & ok[:, None])
            v = load_tile(V, s, h, sv_s, sv_h, sv_m, sv_d, offs_m, offs_dv, v_mask & ok[:, None])
            o = load_tile(O, s, h, so_s, so_h, so_m, so_d, offs_m, offs_dv, v_mask & ok[:, None])
            do = load_tile(dO, s, h, sdo_s, sdo_h, sdo_m, sdo_d, offs_m, offs_dv, v_mask & ok[:, None])
            lse = tl.load(Lse + s * sl_s + h * sl_h + offs_m * sl_m, mask=row_ok & ok, other=0.0)
            logits = dot_ieee(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_M)
            p = tl.exp(logits - lse[:, None])
            p = tl.where(row_ok[:, None] & row_ok[None, :], p, 0.0)  # padded rows and key columns
            dv = dot_ieee(tl.trans(p.to(do.dtype)), do)  # Pᵀ dO: (BLOCK_M, BLOCK_DV)
            dp = dot_ieee(do, tl.trans(v))  # dO vᵀ: (BLOCK_M, BLOCK_M)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # rowsum(dO ⊙ O)
            ds = p * (dp - delta[:, None]) * scale
            dq = dot_ieee(ds.to(k.dtype), k)  # (BLOCK_M, BLOCK_D)
            dk = dot_ieee(tl.trans(ds.to(q.dtype)), q)  # (BLOCK_M, BLOCK_D)
            tl.store(dQ + s * sdq_s + h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
                     dq.to(dQ.dtype.element_ty), mask=qk_mask & ok[:, None])
            tl.store(dK + s * sdk_s + h * sdk_h + offs_m[:, None] * sdk_m + offs_d[None, :] * sdk_d,
                     dk.to(dK.dtype.element_ty), mask=qk_mask & ok[:, None])
            tl.store(dV + s * sdv_s + h * sdv_h + offs_m[:, None] * sdv_m + offs_dv[None, :] * sdv_d,
                     dv.to(dV.dtype.element_ty), mask=v_mask & ok[:, None])


def inner_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward (under q's device). q, k: (S, H, m, d); v: (S, H, m, dv); any strides; fp32/fp16/bf16.
    Returns out (S, H, m, dv) contiguous in q's dtype and lse (S, H, m) float32."""
    _check(q, v)
    S, H, m, d = q.shape
    dv = v.shape[-1]
    out = q.new_empty((S, H, m, dv))
    lse = q.new_empty((S, H, m), dtype=torch.float32)
    n_pairs = S * H
    if n_pairs == 0:
        return out, lse
    bm, bd, bdv, pairs, warps = triton_config(m, d, dv)
    grid = (triton.cdiv(n_pairs, pairs),)
    with device_guard(q):
        _inner_attention_fwd_kernel[grid](
            q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            n_pairs, H, m, d, dv, float(scale),
            BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, PAIRS_PER_PROG=pairs, num_warps=warps)
    return out, lse


def inner_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward, deterministic (no atomics). dout, out: (S, H, m, dv); lse: (S, H, m) fp32;
    any strides. Returns dq, dk (S, H, m, d) and dv (S, H, m, dv), contiguous, in q's dtype."""
    _check(q, v)
    S, H, m, d = q.shape
    dvd = v.shape[-1]
    dq = q.new_empty((S, H, m, d))
    dk = q.new_empty((S, H, m, d))
    dv = q.new_empty((S, H, m, dvd))
    n_pairs = S * H
    if n_pairs == 0:
        return dq, dk, dv
    dout = dout.to(q.dtype)
    bm, bd, bdv, pairs, warps = triton_config(m, d, dvd)
    grid = (triton.cdiv(n_pairs, pairs),)
    with device_guard(q):
        _inner_attention_bwd_kernel[grid](
            dout, q, k, v, out, lse, dq, dk, dv,
            *dout.stride(), *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(),
            n_pairs, H, m, d, dvd, float(scale),
            BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, PAIRS_PER_PROG=pairs, num_warps=warps)
    return dq, dk, dv


@torch.library.custom_op("tntkernels::inner_attention_triton", mutates_args=())
def _inner_attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return inner_attention_forward(q, k, v, scale)


@_inner_attention_triton_op.register_fake
def _inner_attention_triton_fake(q, k, v, scale):
    S, H, m, _ = q.shape
    return q.new_empty((S, H, m, v.shape[-1])), q.new_empty((S, H, m), dtype=torch.float32)


@torch.library.custom_op("tntkernels::inner_attention_triton_backward", mutates_args=())
def _inner_attention_triton_backward_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return inner_attention_backward(grad_out, q, k, v, out, lse, scale)


@_inner_attention_triton_backward_op.register_fake
def _inner_attention_triton_backward_fake(grad_out, q, k, v, out, lse, scale):
    S, H, m, d = q.shape
    return q.new_empty((S, H, m, d)), q.new_empty((S, H, m, d)), q.new_empty((S, H, m, v.shape[-1]))


def _backward(inputs, outputs, grads, needs):
    q, k, v, scale = inputs
    out, lse = outputs
    return (*_inner_attention_triton_backward_op(grads[0].contiguous(), q, k, v, out, lse, scale), None)


register_kernel_autograd(_inner_attention_triton_op, reference=inner_attention_ref, backward=_backward,
                         saved_outputs=(0, 1), non_differentiable=(1,))


def inner_attention(q, k, v, scale: float) -> torch.Tensor:
    """The Triton op (inputs checked by `tntkernels.inner_attention`)."""
    out, _ = _inner_attention_triton_op(q, k, v, scale)
    return out

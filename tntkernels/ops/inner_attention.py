"""Batched inner-block attention: softmax(q kᵀ · scale) v over many short sequences.

TNT (Han et al. 2021, arXiv 2103.00112, Eq. 2-3) runs multi-head self-attention among the m
"visual words" of every "visual sentence": for TNT-S, (B·196 sentences, 4 heads, 16 words,
head_dim 6). This file holds the pure-PyTorch reference `inner_attention_ref`, the registration
(fake kernel and autograd) of the compiled op `torch.ops.tntkernels.inner_attention`, the Triton
kernels `_inner_attention_fwd_kernel` / `_inner_attention_bwd_kernel` with their launchers and the
custom op `torch.ops.tntkernels.inner_attention_triton` (same (out, lse) contract), and the public
`inner_attention` that dispatches between them. The Triton part is defined only when triton is
installed; whether it is interpreted (TRITON_INTERPRET=1, CPU tensors) is fixed at import time.

Compiled op schemas (csrc/tntkernels.cpp):
    inner_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)
    inner_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                             Tensor lse, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)
`lse` is the per-row log-sum-exp of the scaled logits, (S, H, m), float32 (float64 for float64
inputs); it is saved for backward and carries no gradient.
"""
from __future__ import annotations

import torch

from .. import _backend
from ._checks import check_head_dim, check_same, check_scale, check_tensor


def inner_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference softmax(q kᵀ · scale) v in plain PyTorch (materializes the logits).

    Args:
        q, k: (S, H, m, d); v: (S, H, m, dv) — S sequences, H heads, m tokens, head_dim d (dv for v).
            Any floating dtype (float64 for oracles), one device, any strides.
        scale: float, default d ** -0.5.
    Returns:
        (S, H, m, dv), dtype of q. The softmax runs in q's dtype, as timm's TNT Attention does.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale  # (S, H, m, m)
    return logits.softmax(dim=-1) @ v  # (S, H, m, dv)


# ---------------------------------------------------------------------------------------------
# Registration of the compiled op: fake (meta) kernel for torch.compile, autograd formula.
# ---------------------------------------------------------------------------------------------

def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output):
    """Autograd context of every (q, k, v, scale) -> (out, lse) op: lse carries no gradient."""
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward_with(backward_op):
    """Autograd backward calling backward_op(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)."""
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        if torch.is_grad_enabled():
            # create_graph=True (double backward): differentiate the reference formula instead, so
            # second-order gradients are exact rather than silently missing.
            grads = torch.autograd.grad(inner_attention_ref(q, k, v, ctx.scale), (q, k, v), grad_out,
                                        create_graph=True, allow_unused=True)
            return (*grads, None)
        return (*backward_op(grad_out, q, k, v, out, lse, ctx.scale), None)
    return backward


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::inner_attention")
    def _inner_attention_fake(q, k, v, scale):
        S, H, m, _ = q.shape
        out = q.new_empty((S, H, m, v.shape[-1]))
        lse = q.new_empty((S, H, m), dtype=_lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("tntkernels::inner_attention_backward")
    def _inner_attention_backward_fake(grad_out, q, k, v, out, lse, scale):
        # contiguous, as the C++ op returns them (empty_like would copy a permuted input's strides)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_autograd(
        "tntkernels::inner_attention",
        _backward_with(lambda g, *saved: torch.ops.tntkernels.inner_attention_backward(g.contiguous(), *saved)),
        setup_context=_setup_context)


def _compiled(q, k, v, scale):
    out, _ = torch.ops.tntkernels.inner_attention(q, k, v, scale)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels → launchers → custom op "tntkernels::inner_attention_triton" (+ fake, autograd).
# Each program owns PAIRS_PER_PROG whole (sequence, head) pairs: the m×m logits tile lives in
# registers, (sequence × head) runs on grid axis 0 only (no 65,535 limit), backward has no atomics.
# ---------------------------------------------------------------------------------------------

MAX_TRITON_TOKENS = 64  # m: the whole m×m logits tile sits in registers
MAX_TRITON_HEAD_DIM = 64  # d and dv
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCKS = (16, 32, 64)  # tl.dot needs K >= 16 for 16-bit inputs on NVIDIA GPUs


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _triton_launch_params(block_m: int, block_d: int, block_dv: int) -> tuple[int, int]:
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
    bm, bd, bdv = _block(m), _block(d), _block(dv)
    return (bm, bd, bdv, *_triton_launch_params(bm, bd, bdv))


def triton_configs() -> list[tuple[int, int, int, int, torch.dtype, int]]:
    """Every (BLOCK_M, BLOCK_D, BLOCK_DV, PAIRS_PER_PROG, dtype, num_warps) the launchers can choose
    for m, d, dv <= 64 (both kernels use the same set); the tests compile each for sm_80 and sm_90."""
    configs = []
    for bm in _BLOCKS:
        for bd in _BLOCKS:
            for bdv in _BLOCKS:
                pairs, warps = _triton_launch_params(bm, bd, bdv)
                configs += [(bm, bd, bdv, pairs, dtype, warps) for dtype in _TRITON_DTYPES]
    return configs


if _backend.triton_importable():
    import triton
    import triton.language as tl

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
            q = tl.load(Q + s * sq_s + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                        mask=qk_mask & ok[:, None], other=0.0)
            k = tl.load(K + s * sk_s + h * sk_h + offs_m[:, None] * sk_m + offs_d[None, :] * sk_d,
                        mask=qk_mask & ok[:, None], other=0.0)
            v = tl.load(V + s * sv_s + h * sv_h + offs_m[:, None] * sv_m + offs_dv[None, :] * sv_d,
                        mask=v_mask & ok[:, None], other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_M) fp32
            logits = tl.where(row_ok[None, :], logits, float("-inf"))  # padded key columns
            row_max = tl.max(logits, axis=1)
            p = tl.exp(logits - row_max[:, None])
            denom = tl.sum(p, axis=1)
            out = tl.dot(p.to(v.dtype), v, input_precision="ieee") / denom[:, None]  # (BLOCK_M, BLOCK_DV)
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
            q = tl.load(Q + s * sq_s + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                        mask=qk_mask & ok[:, None], other=0.0)
            k = tl.load(K + s * sk_s + h * sk_h + offs_m[:, None] * sk_m + offs_d[None, :] * sk_d,
                        mask=qk_mask & ok[:, None], other=0.0)
            v = tl.load(V + s * sv_s + h * sv_h + offs_m[:, None] * sv_m + offs_dv[None, :] * sv_d,
                        mask=v_mask & ok[:, None], other=0.0)
            o = tl.load(O + s * so_s + h * so_h + offs_m[:, None] * so_m + offs_dv[None, :] * so_d,
                        mask=v_mask & ok[:, None], other=0.0)
            do = tl.load(dO + s * sdo_s + h * sdo_h + offs_m[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                         mask=v_mask & ok[:, None], other=0.0)
            lse = tl.load(Lse + s * sl_s + h * sl_h + offs_m * sl_m, mask=row_ok & ok, other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_M)
            p = tl.exp(logits - lse[:, None])
            p = tl.where(row_ok[:, None] & row_ok[None, :], p, 0.0)  # padded rows and key columns
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")  # Pᵀ dO: (BLOCK_M, BLOCK_DV)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # dO vᵀ: (BLOCK_M, BLOCK_M)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # rowsum(dO ⊙ O)
            ds = p * (dp - delta[:, None]) * scale
            dq = tl.dot(ds.to(k.dtype), k, input_precision="ieee")  # (BLOCK_M, BLOCK_D)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")  # (BLOCK_M, BLOCK_D)
            tl.store(dQ + s * sdq_s + h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
                     dq.to(dQ.dtype.element_ty), mask=qk_mask & ok[:, None])
            tl.store(dK + s * sdk_s + h * sdk_h + offs_m[:, None] * sdk_m + offs_d[None, :] * sdk_d,
                     dk.to(dK.dtype.element_ty), mask=qk_mask & ok[:, None])
            tl.store(dV + s * sdv_s + h * sdv_h + offs_m[:, None] * sdv_m + offs_dv[None, :] * sdv_d,
                     dv.to(dV.dtype.element_ty), mask=v_mask & ok[:, None])


def _check_triton(q: torch.Tensor, v: torch.Tensor) -> None:
    S, H, m, d = q.shape
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"inner_attention: the 'triton' backend supports float32, float16 and bfloat16, got {q.dtype}")
    if not (1 <= m <= MAX_TRITON_TOKENS and 1 <= d <= MAX_TRITON_HEAD_DIM and 1 <= v.shape[-1] <= MAX_TRITON_HEAD_DIM):
        raise ValueError(f"inner_attention: the 'triton' backend supports 1 <= m <= {MAX_TRITON_TOKENS} and "
                         f"1 <= d, dv <= {MAX_TRITON_HEAD_DIM}, got m={m}, d={d}, dv={v.shape[-1]}")


def inner_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. q, k: (S, H, m, d); v: (S, H, m, dv); any strides; fp32/fp16/bf16.
    Returns out (S, H, m, dv) contiguous in q's dtype and lse (S, H, m) float32."""
    _check_triton(q, v)
    S, H, m, d = q.shape
    dv = v.shape[-1]
    out = q.new_empty((S, H, m, dv))
    lse = q.new_empty((S, H, m), dtype=torch.float32)
    n_pairs = S * H
    if n_pairs == 0:
        return out, lse
    bm, bd, bdv, pairs, warps = triton_config(m, d, dv)
    grid = (triton.cdiv(n_pairs, pairs),)
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
    _check_triton(q, v)
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


_inner_attention_triton_op.register_autograd(_backward_with(_inner_attention_triton_backward_op),
                                             setup_context=_setup_context)


def _triton(q, k, v, scale):
    out, _ = _inner_attention_triton_op(q, k, v, scale)
    return out


_IMPLEMENTED = {"reference": inner_attention_ref, "cpu": _compiled, "cuda": _compiled, "triton": _triton}
# backend=None on CUDA tensors stays on the reference until the CUDA C++ and Triton kernels have
# passed their GPU tests on hardware (scripts/gpu_suite.sh); then the benchmark picks the order.
# Until then they run only when asked for by name: an unverified kernel is never the default.
_PREFERENCE = {"cpu": ("cpu",), "cuda": ()}
MAX_CUDA_HEAD_DIM = 64  # the CUDA C++ kernels keep a row of q / out in registers
# backend=None on CPU uses the C++ op up to this head_dim (TNT's inner 6 / 10 and RTNT's letters);
# above it, measured on a 2-core x86 machine (d = 32, m = 17), the reference's batched GEMMs win.
MAX_AUTO_CPU_HEAD_DIM = 16


def inner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over many short sequences (TNT inner attention).

    Args:
        q, k: (S, H, m, d); v: (S, H, m, dv) — S sequences (sentences × batch), H heads, m tokens
            (words), d head_dim of queries and keys, dv of values. float16, bfloat16, float32 or
            float64, one device; any strides (permuted views of the qk / v Linear outputs are fine).
        scale: float, default d ** -0.5.
        backend: None (best available for the device and shape, or TNTKERNELS_BACKEND: on CPU the
            C++ op for head_dim ≤ 16, the reference above; on CUDA the reference until the GPU
            kernels are verified on hardware), "reference", "cpu", "cuda" or "triton".
    Returns:
        (S, H, m, dv), dtype of q. Differentiable with respect to q, k and v.
    Raises:
        TypeError: an input is not a tensor; scale not a real number.
        ValueError: shapes, dtypes or devices disagree; a sparse input; head_dim d = 0; scale not
            finite; backend unknown; d or dv > 64 with the "cuda" backend; m, d or dv > 64 or
            float64 with the "triton" backend. Every check: docs/bad-input.md.
        RuntimeError: the requested backend is not implemented or not available for q's device.
    Source: Han et al. 2021 (TNT), Eq. 2-3; Vaswani et al. 2017, Eq. 1.
    """
    op = "inner_attention"
    check_tensor(op, "q", q, 4, "(S, H, m, d)")
    check_tensor(op, "k", k, 4, "(S, H, m, d)")
    check_tensor(op, "v", v, 4, "(S, H, m, dv)")
    check_same(op, "q", q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape (S, H, m, d) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must have shape (S, H, m, dv) with (S, H, m) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    check_head_dim(op, q, "(S, H, m, d)")
    scale = check_scale(op, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = _backend.resolve(op, backend, q.device, _IMPLEMENTED, _PREFERENCE)
    if name == "cpu" and backend is None and max(q.shape[-1], v.shape[-1]) > MAX_AUTO_CPU_HEAD_DIM:
        name = "reference"  # wider heads: PyTorch's batched GEMMs beat the C++ op (benchmarks/)
    if name == "triton":
        fits = (q.dtype in _TRITON_DTYPES and q.shape[-2] <= MAX_TRITON_TOKENS
                and max(q.shape[-1], v.shape[-1]) <= MAX_TRITON_HEAD_DIM)
        if backend is None and not fits:
            name = "reference"
        elif not fits:
            _check_triton(q, v)  # raises ValueError naming the supported range
    if name == "cuda" and max(q.shape[-1], v.shape[-1]) > MAX_CUDA_HEAD_DIM:
        if backend is None:
            name = "reference"
        else:
            raise ValueError(f"{op}: the 'cuda' backend supports head_dim d, dv <= {MAX_CUDA_HEAD_DIM}, "
                             f"got d={q.shape[-1]}, dv={v.shape[-1]}")
    return _IMPLEMENTED[name](q, k, v, scale)

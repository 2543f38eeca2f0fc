"""Batched inner-block attention: softmax(q kᵀ · scale) v over many short sequences.

TNT (Han et al. 2021, arXiv 2103.00112, Eq. 2-3) runs multi-head self-attention among the m
"visual words" of every "visual sentence": for TNT-S, (B·196 sentences, 4 heads, 16 words,
head_dim 6). This file holds the pure-PyTorch reference `inner_attention_ref`, the registration
(fake kernel and autograd) of the compiled op `torch.ops.tntkernels.inner_attention`, and the public
`inner_attention` that dispatches between them.

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
from ._checks import check_same, check_scale, check_tensor


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


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::inner_attention")
    def _inner_attention_fake(q, k, v, scale):
        S, H, m, _ = q.shape
        out = q.new_empty((S, H, m, v.shape[-1]))
        lse = q.new_empty((S, H, m), dtype=_lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("tntkernels::inner_attention_backward")
    def _inner_attention_backward_fake(grad_out, q, k, v, out, lse, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None
        if torch.is_grad_enabled():
            # create_graph=True (double backward): differentiate the reference formula instead, so
            # second-order gradients are exact rather than silently missing.
            grads = torch.autograd.grad(inner_attention_ref(q, k, v, ctx.scale), (q, k, v), grad_out,
                                        create_graph=True, allow_unused=True)
            return (*grads, None)
        dq, dk, dv = torch.ops.tntkernels.inner_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    torch.library.register_autograd("tntkernels::inner_attention", _backward, setup_context=_setup_context)


def _compiled(q, k, v, scale):
    out, _ = torch.ops.tntkernels.inner_attention(q, k, v, scale)
    return out


_IMPLEMENTED = {"reference": inner_attention_ref, "cpu": _compiled, "cuda": _compiled}
_PREFERENCE = {"cpu": ("cpu",), "cuda": ("cuda",)}
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
            C++ op for head_dim ≤ 16, the reference above), "reference", "cpu", "cuda" or "triton".
    Returns:
        (S, H, m, dv), dtype of q. Differentiable with respect to q, k and v.
    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes, dtypes or devices disagree; scale not finite; backend unknown;
            dv > 64 with the "cuda" backend.
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
    scale = check_scale(op, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = _backend.resolve(op, backend, q.device, _IMPLEMENTED, _PREFERENCE)
    if name == "cpu" and backend is None and max(q.shape[-1], v.shape[-1]) > MAX_AUTO_CPU_HEAD_DIM:
        name = "reference"  # wider heads: PyTorch's batched GEMMs beat the C++ op (benchmarks/)
    if name == "cuda" and max(q.shape[-1], v.shape[-1]) > MAX_CUDA_HEAD_DIM:
        if backend is None:
            name = "reference"
        else:
            raise ValueError(f"{op}: the 'cuda' backend supports head_dim d, dv <= {MAX_CUDA_HEAD_DIM}, "
                             f"got d={q.shape[-1]}, dv={v.shape[-1]}")
    return _IMPLEMENTED[name](q, k, v, scale)

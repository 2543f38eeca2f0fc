"""Batched inner-block attention, softmax(q kᵀ · scale) v over many short sequences: the public op.

TNT (Han et al. 2021, arXiv 2103.00112, Eq. 1) runs multi-head self-attention among the m "visual
words" of every "visual sentence": for TNT-S, (B·196 sentences, 4 heads, 16 words, head_dim 6)
(docs/tnt-family.md §1). Reference: `reference/inner_attention.py`; kernels: `cpp/inner_attention.py`
(C++ CPU, CUDA C++) and `triton/inner_attention.py`; backend choice: `registry.py`.
"""
from __future__ import annotations

import torch

from . import registry
from ._checks import check_head_dim, check_same, check_scale, check_tensor
from .reference.inner_attention import inner_attention_ref

__all__ = ["inner_attention", "inner_attention_ref"]


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
            finite; backend unknown; outside the range of the backend named (the "cuda" backend:
            m, d, dv <= 64; "triton": m, d, dv <= 64, no float64). Every check: docs/bad-input.md.
        RuntimeError: the requested backend is not implemented or not available for q's device.
    Source: Han et al. 2021 (TNT), Eq. 1; Vaswani et al. 2017, Eq. 1.
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
    return registry.call(op, backend, q.device, (q, v), q, k, v, scale)

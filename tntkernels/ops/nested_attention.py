"""Nested-logit multi-head attention (Nested-TNT / CODA / RealFormer): the public op.

Each layer's pre-softmax logits are handed to the next layer and added there; formulas in
`reference/nested_attention.py` and docs/tnt-family.md §3. Kernels: `cpp/nested_attention.py` (C++
CPU, CUDA C++) and `triton/nested_attention.py`; backend choice: `registry.py`.
"""
from __future__ import annotations

import torch

from . import registry
from ._checks import check_head_dim, check_same, check_scale, check_shape, check_tensor
from .reference.nested_attention import LEAKY_SLOPE, head_mlp_ref, nested_attention_ref

__all__ = ["nested_attention", "nested_attention_ref", "head_mlp_ref", "check_inputs", "LEAKY_SLOPE"]


def check_inputs(op: str, q, k, v, prev_logits, head_mlp, noise, scale):
    """The checks every entry point of nested attention makes (shapes as `nested_attention`).

    Returns (head_mlp as a tuple or None, scale as given or None).
    Raises TypeError / ValueError naming the expected shape, dtype or device of the offending input.
    """
    check_tensor(op, "q", q, 4, "(B, H, T, d)")
    check_tensor(op, "k", k, 4, "(B, H, T, d)")
    check_tensor(op, "v", v, 4, "(B, H, T, dv)")
    check_same(op, "q", q, k=k, v=v, prev_logits=prev_logits, noise=noise)
    B, H, T, _ = q.shape
    check_shape(op, "k", k, q.shape, "(B, H, T, d)")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must have shape (B, H, T, dv) with (B, H, T) = {(B, H, T)}, got {tuple(v.shape)}")
    check_head_dim(op, q, "(B, H, T, d)")
    for name, t in (("prev_logits", prev_logits), ("noise", noise)):
        if t is not None:
            check_tensor(op, name, t, 4, "(B, H, T, T)")
            check_shape(op, name, t, (B, H, T, T), "(B, H, T, T)")
    return _check_head_mlp(op, head_mlp, H, q), check_scale(op, scale)


def _check_head_mlp(op: str, head_mlp, H: int, q: torch.Tensor):
    if head_mlp is None:
        return None
    if isinstance(head_mlp, torch.Tensor) or not hasattr(head_mlp, "__iter__"):
        raise TypeError(f"{op}: head_mlp must be None or a sequence of 6 tensors (w1, b1, w2, b2, w3, b3), "
                        f"got {type(head_mlp).__name__}")
    head_mlp = tuple(head_mlp)
    if len(head_mlp) != 6:
        raise ValueError(f"{op}: head_mlp must be 6 tensors (w1, b1, w2, b2, w3, b3), got {len(head_mlp)}")
    names = ("w1", "b1", "w2", "b2", "w3", "b3")
    shapes = ((4 * H, H), (4 * H,), (4 * H, 4 * H), (4 * H,), (H, 4 * H), (H,))
    dims = ("(4H, H)", "(4H,)", "(4H, 4H)", "(4H,)", "(H, 4H)", "(H,)")
    for name, t, shape, dim in zip(names, head_mlp, shapes, dims):
        check_tensor(op, f"head_mlp.{name}", t)
        check_same(op, "q", q, **{f"head_mlp.{name}": t})
        check_shape(op, f"head_mlp.{name}", t, shape, dim)
    return head_mlp


def nested_attention(q, k, v, prev_logits=None, *, head_mlp=None, noise=None, scale=None, backend=None):
    """Nested-logit multi-head attention; returns the output and the logits for the next layer.

    Args:
        q, k: (B, H, T, d); v: (B, H, T, dv) — float16, bfloat16, float32 or float64, one device.
        prev_logits: None or the previous layer's logits Z_{l-1}, (B, H, T, T), q's dtype.
        head_mlp: None (RealFormer form) or (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H),
            b3 (H)) (CODA form, nn.Linear convention).
        noise: None or (B, H, T, T) added to the logits (training).
        scale: float, default d ** -0.5.
        backend: None (on CPU the C++ op where it was measured faster — float32 at T = 16, or with
            head_mlp up to T = 256, head dims <= 64 — else the reference; on CUDA the reference for
            now: see `registry.OPS`), "reference", "cpu" (C++ op),
            "cuda" (CUDA C++: T <= 64, H <= 16, d, dv <= 64) or "triton" (T <= 1024, H <= 16,
            d, dv <= 64; float32 / float16 / bfloat16).
    Returns:
        (out (B, H, T, dv), logits (B, H, T, T)), q's dtype; differentiable in every tensor input.
    Raises:
        TypeError / ValueError: an input is not a tensor, or shapes, dtypes or devices disagree;
            head_dim d = 0; scale not a finite real number; backend unknown; outside the "cuda" or
            "triton" backend's range above. Every check: docs/bad-input.md.
        RuntimeError: the requested backend is not implemented or not available.
    Source: CODA (Zheng et al. 2021), Nested-TNT (Liu et al. 2024, arXiv 2404.13434), RealFormer.
    """
    op = "nested_attention"
    head_mlp, scale = check_inputs(op, q, k, v, prev_logits, head_mlp, noise, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    use_mlp = prev_logits is not None and head_mlp is not None
    return registry.call(op, backend, q.device, (q, v, use_mlp), q, k, v, prev_logits, head_mlp, noise, scale)

"""Nested-logit multi-head attention (Nested-TNT / CODA / RealFormer).

Each layer's pre-softmax logits are handed to the next layer and added there (spec:
shared/specs/tnt-family.md §3). Per layer l, heads H, tokens T, A_l = (Q_l · scale) K_lᵀ:

    layer 1:    Z_1 = A_1
    layer l>1:  S_l = A_l + Z_{l-1};   Z_l = S_l + MLP_heads(S_l)   (CODA; RealFormer: Z_l = S_l)
    training:   Z_l = Z_l + ε
    out_l = softmax_keys(Z_l) V_l

MLP_heads acts on the head axis at every (b, i, j): Linear(H, 4H) → LeakyReLU(0.2) →
Linear(4H, 4H) → LeakyReLU(0.2) → Linear(4H, H). Positions where S_l is −inf stay −inf and enter
the MLP as 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ._checks import check_head_dim, check_same, check_scale, check_shape, check_tensor

LEAKY_SLOPE = 0.2


def head_mlp_ref(s: torch.Tensor, head_mlp) -> torch.Tensor:
    """CODA's head-MLP on the head axis of s (B, H, T, T); −inf entries enter as 0.

    head_mlp: (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)), nn.Linear convention.
    Returns (B, H, T, T): MLP_heads(s), without the residual.
    """
    w1, b1, w2, b2, w3, b3 = head_mlp
    x = s.masked_fill(torch.isneginf(s), 0.0).permute(0, 2, 3, 1)  # (B, T, T, H)
    x = F.leaky_relu(F.linear(x, w1, b1), LEAKY_SLOPE)  # (B, T, T, 4H)
    x = F.leaky_relu(F.linear(x, w2, b2), LEAKY_SLOPE)  # (B, T, T, 4H)
    x = F.linear(x, w3, b3)  # (B, T, T, H)
    return x.permute(0, 3, 1, 2)  # (B, H, T, T)


def nested_attention_ref(q, k, v, prev_logits=None, head_mlp=None, noise=None, scale=None):
    """Reference nested-logit attention in plain PyTorch.

    Args:
        q, k: (B, H, T, d); v: (B, H, T, dv). Any floating dtype, one device.
        prev_logits: None (first layer: Z = A) or Z_{l-1}, (B, H, T, T).
        head_mlp: None (RealFormer: Z = A + Z_{l-1}) or the six CODA head-MLP tensors
            (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)); used only when
            prev_logits is given (layer 1 has Z_1 = A_1).
        noise: None or (B, H, T, T), added to Z (training-time ε ~ N(0, 1)).
        scale: float, default d ** -0.5.
    Returns:
        (out (B, H, T, dv), logits Z (B, H, T, T)), dtype of q; Z is what the next layer receives.
    Source: Zheng, Wu, Kong 2021 (CODA), Eq. 6-8; Liu, Qiu, Qin 2024 (Nested-TNT); He et al. 2021
        (RealFormer).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    z = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if prev_logits is not None:
        z = z + prev_logits
        if head_mlp is not None:
            z = z + head_mlp_ref(z, head_mlp)
    if noise is not None:
        z = z + noise
    out = z.softmax(dim=-1) @ v  # (B, H, T, dv)
    return out, z


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


def _check_cuda(op: str, q: torch.Tensor, v: torch.Tensor) -> None:
    """The CUDA C++ kernels' limits, checked here so they raise ValueError like the Triton ones."""
    B, H, T, d = q.shape
    cpp = nested_attention_cpp
    if q.dtype == torch.float64:
        raise ValueError(f"{op}: the 'cuda' backend supports float32, float16 and bfloat16, got {q.dtype}")
    if not (T <= cpp.CUDA_MAX_TOKENS and H <= cpp.CUDA_MAX_HEADS and max(d, v.shape[-1]) <= cpp.CUDA_MAX_HEAD_DIM):
        raise ValueError(f"{op}: the 'cuda' backend supports T <= {cpp.CUDA_MAX_TOKENS}, H <= {cpp.CUDA_MAX_HEADS} "
                         f"and d, dv <= {cpp.CUDA_MAX_HEAD_DIM}, got T={T}, H={H}, d={d}, dv={v.shape[-1]}")


def _compiled(q, k, v, prev_logits, head_mlp, noise, scale):
    return nested_attention_cpp.nested_attention_compiled(q, k, v, prev_logits, head_mlp, noise, scale)


def _triton(q, k, v, prev_logits, head_mlp, noise, scale):
    return nested_attention_triton.nested_attention_triton(q, k, v, prev_logits, head_mlp, noise, scale)


_IMPLEMENTED = {"reference": nested_attention_ref, "cpu": _compiled, "cuda": _compiled, "triton": _triton}
# backend=None stays on the reference: on CPU the C++ op is not faster than PyTorch's batched GEMMs
# yet (measured: TNT-S inner shape, fwd+bwd, 2 threads), and on CUDA the CUDA C++ and Triton kernels
# have not yet passed their GPU tests on hardware (scripts/gpu_suite.sh); the benchmark then sets the
# order. Until then they run only when asked for by name.
_PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": (), "cuda": ()}


def nested_attention(q, k, v, prev_logits=None, *, head_mlp=None, noise=None, scale=None, backend=None):
    """Nested-logit multi-head attention; returns the output and the logits for the next layer.

    Args:
        q, k: (B, H, T, d); v: (B, H, T, dv) — float16, bfloat16, float32 or float64, one device.
        prev_logits: None or the previous layer's logits Z_{l-1}, (B, H, T, T), q's dtype.
        head_mlp: None (RealFormer form) or (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H),
            b3 (H)) (CODA form, nn.Linear convention).
        noise: None or (B, H, T, T) added to the logits (training).
        scale: float, default d ** -0.5.
        backend: None (the reference for now, see `_PREFERENCE`), "reference", "cpu" (C++ op), "cuda"
            (CUDA C++: T <= 64, H <= 16, d, dv <= 64) or "triton" (T <= 1024, H <= 16, d, dv <= 64;
            float32 / float16 / bfloat16).
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
    name = _backend.resolve(op, backend, q.device, _IMPLEMENTED, _PREFERENCE)
    if name == "cuda":
        _check_cuda(op, q, v)
    return _IMPLEMENTED[name](q, k, v, prev_logits, head_mlp, noise, scale)


# The kernels' modules import this one (reference, checks): import them last, to register their ops.
from . import nested_attention_cpp, nested_attention_triton  # noqa: E402

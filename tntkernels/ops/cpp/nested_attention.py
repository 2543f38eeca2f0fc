"""Compiled nested-logit attention (`torch.ops.tntkernels.nested_attention`, C++ CPU and CUDA C++).

Schemas (csrc/tntkernels.cpp):
    nested_attention(Tensor q, Tensor k, Tensor v, Tensor? prev_logits, Tensor[] head_mlp, Tensor? noise,
                     float scale) -> (Tensor out, Tensor logits, Tensor lse)
    nested_attention_backward(Tensor grad_out, Tensor? grad_logits, Tensor q, Tensor k, Tensor v,
                              Tensor? prev_logits, Tensor[] head_mlp, Tensor? noise, Tensor out, Tensor lse,
                              float scale) -> Tensor[]
head_mlp is [] (RealFormer form) or (w1, b1, w2, b2, w3, b3) (CODA form); the MLP is used only when
prev_logits is given. lse (B, H, T) is float32 (float64 for float64 inputs) and carries no gradient.
The backward returns [dq, dk, dv, dprev] (dprev empty when prev_logits is None) and then the six MLP
gradients when the MLP was used. No gradient flows into noise. Semantics: `nested_attention_ref`;
the CUDA limits (T, H, d) are exported by `tntkernels._C.limits()`.
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.nested_attention import nested_attention_op_ref
from . import cuda_limit, lse_dtype, unsupported_dtype_cuda


def _mlp_used(prev_logits, head_mlp) -> bool:
    return prev_logits is not None and len(head_mlp) == 6


def unsupported_cuda(q: torch.Tensor, v: torch.Tensor, has_mlp: bool = True) -> str | None:
    """None when the CUDA C++ kernels cover q (B, H, T, d), v (B, H, T, dv), else what they do not."""
    why = unsupported_dtype_cuda(q)
    if why is not None:
        return why
    B, H, T, d = q.shape
    T_max, H_max, d_max = (cuda_limit("nested_attention", w) for w in ("max_tokens", "max_heads", "max_head_dim"))
    if not (T <= T_max and H <= H_max and max(d, v.shape[-1]) <= d_max):
        return f"T={T}, H={H}, d={d}, dv={v.shape[-1]} (supported: T <= {T_max}, H <= {H_max} and d, dv <= {d_max})"
    return None


def _backward(inputs, outputs, grads, needs):
    q, k, v, prev, head_mlp, noise, scale = inputs
    out, lse = outputs  # saved_outputs (0, 2)
    grad_out, grad_logits = grads
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The kernels recompute the logits Z in the accumulation type (noise included) as the forward did
    # before rounding them to q's dtype, so P = exp(Z − lse) is the forward's softmax in fp16 / bf16 too.
    res = torch.ops.tntkernels.nested_attention_backward(
        grad_out.contiguous(), None if grad_logits is None else grad_logits.contiguous(),
        q, k, v, prev, head_mlp, noise, out, lse, scale)
    dmlp = list(res[4:10]) if _mlp_used(prev, head_mlp) else [None] * len(head_mlp)
    return res[0], res[1], res[2], (res[3] if prev is not None else None), dmlp, None, None


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::nested_attention")
    def _fake(q, k, v, prev_logits, head_mlp, noise, scale):
        B, H, T, _ = q.shape
        return (q.new_empty((B, H, T, v.shape[-1])), q.new_empty((B, H, T, T)),
                q.new_empty((B, H, T), dtype=lse_dtype(q.dtype)))

    @torch.library.register_fake("tntkernels::nested_attention_backward")
    def _backward_fake(grad_out, grad_logits, q, k, v, prev_logits, head_mlp, noise, out, lse, scale):
        res = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
               prev_logits.new_empty(prev_logits.shape) if prev_logits is not None else q.new_empty((0,))]
        if _mlp_used(prev_logits, head_mlp):
            res += [w.new_empty(w.shape) for w in head_mlp]
        return res

    register_kernel_autograd("tntkernels::nested_attention", reference=nested_attention_op_ref, backward=_backward,
                             saved_outputs=(0, 2), non_differentiable=(2,))


def nested_attention(q, k, v, prev_logits, head_mlp, noise, scale: float):
    """The compiled op on q's device (inputs checked by `tntkernels.nested_attention`); head_mlp a
    tuple of six tensors or None. Returns (out, logits)."""
    out, logits, _ = torch.ops.tntkernels.nested_attention(q, k, v, prev_logits, list(head_mlp or ()), noise,
                                                           float(scale))
    return out, logits

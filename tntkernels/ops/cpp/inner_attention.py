"""Compiled inner attention (`torch.ops.tntkernels.inner_attention`, C++ CPU and CUDA C++).

Schemas (csrc/tntkernels.cpp):
    inner_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)
    inner_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                             Tensor lse, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)
`lse` is the per-row log-sum-exp of the scaled logits, (S, H, m), float32 (float64 for float64
inputs); it is saved for backward and carries no gradient. Semantics: `inner_attention_ref`.
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.inner_attention import inner_attention_ref
from . import cuda_limit, lse_dtype


def unsupported_cuda(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the CUDA C++ kernels cover q (S, H, m, d), v (S, H, m, dv), else what they do not."""
    limit = cuda_limit("inner_attention", "max_head_dim")
    if max(q.shape[-1], v.shape[-1]) > limit:
        return f"head_dim d={q.shape[-1]}, dv={v.shape[-1]} (supported: d, dv <= {limit})"
    S, H, m, _ = q.shape
    max_m, max_rows = cuda_limit("inner_attention", "max_tokens"), cuda_limit("inner_attention", "max_rows")
    if m > max_m or S * H * m > max_rows:
        return f"m={m}, S·H·m={S * H * m} (supported: m <= {max_m}, S·H·m <= {max_rows})"
    return None


def _backward(inputs, outputs, grads, needs):
    q, k, v, scale = inputs
    out, lse = outputs
    (grad_out,) = grads
    # Every operand goes in as it is: the CUDA kernels read strided views (rows must be unit-stride, else
    # they copy that one operand), the CPU op makes its own contiguous copies.
    return (*torch.ops.tntkernels.inner_attention_backward(grad_out, q, k, v, out, lse, scale), None)


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::inner_attention")
    def _fake(q, k, v, scale):
        S, H, m, _ = q.shape
        return q.new_empty((S, H, m, v.shape[-1])), q.new_empty((S, H, m), dtype=lse_dtype(q.dtype))

    @torch.library.register_fake("tntkernels::inner_attention_backward")
    def _backward_fake(grad_out, q, k, v, out, lse, scale):
        # contiguous, as the C++ op returns them (empty_like would copy a permuted input's strides)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    register_kernel_autograd("tntkernels::inner_attention", reference=inner_attention_ref, backward=_backward,
                             saved_outputs=(0, 1), non_differentiable=(1,))


def inner_attention(q, k, v, scale: float) -> torch.Tensor:
    """The compiled op on q's device (inputs checked by `tntkernels.inner_attention`)."""
    out, _ = torch.ops.tntkernels.inner_attention(q, k, v, scale)
    return out

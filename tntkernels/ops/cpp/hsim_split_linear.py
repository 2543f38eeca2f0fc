"""Compiled H_sim-split linear op (`torch.ops.tntkernels.hsim_split_linear`, C++ CPU and CUDA C++).

Schemas (csrc/tntkernels.cpp):
    hsim_split_linear(Tensor x, Tensor? mix_weight, Tensor? mix_bias, Tensor? block_weight,
                      Tensor? block_bias) -> Tensor
    hsim_split_linear_backward(Tensor grad_y, Tensor x, Tensor? mix_weight, Tensor? mix_bias,
                               Tensor? block_weight, Tensor? block_bias) -> Tensor[]
x is (N, D), D = H·d; the backward returns [dx, dM, dm, dA, da] with 0-element tensors for absent
parameters. The CPU op takes float16 / bfloat16 / float32 / float64 of any size; the CUDA limits
(H, d) are exported by `tntkernels._C.limits()`. Both are deterministic. Semantics:
`hsim_split_linear_ref` (docs/tint.md §1).
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.hsim_split_linear import hsim_split_linear_ref
from . import cuda_limit, unsupported_dtype_cuda


def unsupported_cuda(x: torch.Tensor, H: int, d: int) -> str | None:
    """None when the CUDA C++ kernels cover x (..., H·d), else what they do not (with no weights:
    H = 1, d = D, as the op sees it)."""
    why = unsupported_dtype_cuda(x)
    if why is not None:
        return why
    H_max, d_max = cuda_limit("hsim_split_linear", "max_heads"), cuda_limit("hsim_split_linear", "max_head_dim")
    if not (H <= H_max and d <= d_max):
        return f"H={H} heads, head width d={d} (supported: H <= {H_max} and d <= {d_max})"
    return None


def _backward(inputs, outputs, grads, needs):
    x, *params = inputs
    res = torch.ops.tntkernels.hsim_split_linear_backward(grads[0].contiguous(), x, *params)
    return (res[0], *(r if p is not None else None for r, p in zip(res[1:], params)))


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::hsim_split_linear")
    def _fake(x, mix_weight, mix_bias, block_weight, block_bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake("tntkernels::hsim_split_linear_backward")
    def _backward_fake(grad_y, x, mix_weight, mix_bias, block_weight, block_bias):
        return [x.new_empty(x.shape)] + [t.new_empty(t.shape) if t is not None else x.new_empty((0,))
                                         for t in (mix_weight, mix_bias, block_weight, block_bias)]

    register_kernel_autograd("tntkernels::hsim_split_linear", reference=hsim_split_linear_ref, backward=_backward)


def hsim_split_linear(x, mix_weight, mix_bias, block_weight, block_bias) -> torch.Tensor:
    """The compiled op on x's device, x (..., D) (inputs checked by `tntkernels.hsim_split_linear`)."""
    y = torch.ops.tntkernels.hsim_split_linear(x.reshape(-1, x.shape[-1]), mix_weight, mix_bias, block_weight,
                                               block_bias)
    return y.reshape(x.shape)

"""Registration of the compiled H_sim-split linear ops (C++ CPU, CUDA C++) and a Python entry.

Compiled op schemas (csrc/tntkernels.cpp):
    hsim_split_linear(Tensor x, Tensor? mix_weight, Tensor? mix_bias, Tensor? block_weight,
                      Tensor? block_bias) -> Tensor
    hsim_split_linear_backward(Tensor grad_y, Tensor x, Tensor? mix_weight, Tensor? mix_bias,
                               Tensor? block_weight, Tensor? block_bias) -> Tensor[]
x is (N, D), D = H·d; the backward returns [dx, dM, dm, dA, da] with 0-element tensors for absent
parameters. Semantics: `hsim_split_linear_ref` in hsim_split.py (shared/specs/tint.md §1).

The CUDA kernels support float32 / float16 / bfloat16 with H <= 64 heads and head width d <= 256; the
CPU op supports float16 / bfloat16 / float32 / float64 of any size. Both are deterministic.
"""
from __future__ import annotations

import torch

from .. import _backend
from .hsim_split import hsim_split_linear_ref

CUDA_MAX_HEADS = 64
CUDA_MAX_HEAD_DIM = 256


def _setup_context(ctx, inputs, output):
    x, mix_weight, mix_bias, block_weight, block_bias = inputs
    ctx.present = tuple(t is not None for t in (mix_weight, mix_bias, block_weight, block_bias))
    ctx.save_for_backward(x, *(t for t in (mix_weight, mix_bias, block_weight, block_bias) if t is not None))


def _backward(ctx, grad_y):
    saved = list(ctx.saved_tensors)
    x = saved.pop(0)
    params = [saved.pop(0) if p else None for p in ctx.present]
    if torch.is_grad_enabled():
        # create_graph=True (double backward): differentiate the reference so second-order grads are exact.
        inputs = [x] + params
        need = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
        grads = [None] * 5
        if need:
            y = hsim_split_linear_ref(x, *params)
            got = torch.autograd.grad([y], [inputs[i] for i in need], [grad_y], create_graph=True, allow_unused=True)
            for i, g in zip(need, got):
                grads[i] = g if g is not None else torch.zeros_like(inputs[i])
        return tuple(grads)
    res = torch.ops.tntkernels.hsim_split_linear_backward(grad_y.contiguous(), x, *params)
    return tuple([res[0]] + [r if p is not None else None for r, p in zip(res[1:], params)])


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::hsim_split_linear")
    def _hsim_split_linear_fake(x, mix_weight, mix_bias, block_weight, block_bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake("tntkernels::hsim_split_linear_backward")
    def _hsim_split_linear_backward_fake(grad_y, x, mix_weight, mix_bias, block_weight, block_bias):
        return [x.new_empty(x.shape)] + [t.new_empty(t.shape) if t is not None else x.new_empty((0,))
                                         for t in (mix_weight, mix_bias, block_weight, block_bias)]

    torch.library.register_autograd("tntkernels::hsim_split_linear", _backward, setup_context=_setup_context)


def hsim_split_linear_compiled(x, mix_weight=None, mix_bias=None, block_weight=None, block_bias=None):
    """TinT's H_sim-split linear map y = Block(Mix(x)) through the compiled op (CPU C++ or CUDA C++ by
    x's device); either part may be None.

    Args:
        x: (..., D), D = H·d; float16, bfloat16, float32 or float64 (CUDA: not float64). Any strides.
        mix_weight: (d, H, H) M[k, h, g] or None; mix_bias: (d, H) m[k, g] or None (only with mix_weight).
        block_weight: (H, d, d) A[g][k, j] or None; block_bias: (H, d) a[g, j] or None (only with block_weight).
        All tensors share x's dtype and device.
    Returns:
        (..., D) in x's dtype (a new contiguous tensor); differentiable in x and every weight and bias
        (first order through the compiled backward, higher orders through the reference).
    Raises:
        RuntimeError: tntkernels._C is not built; or, from the op, shapes / dtypes / devices disagree, a
            bias is given without its weight, D != H·d, or (CUDA) H > 64, d > 256 or float64.
    Source: Panigrahi et al. 2023 (TinT), §3; shared/specs/tint.md §1.
    """
    if not _backend.cpp_available():
        raise RuntimeError(f"hsim_split_linear_compiled: tntkernels._C is not built ({_backend._C_ERROR})")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("hsim_split_linear_compiled: x must be a tensor of shape (..., D)")
    y = torch.ops.tntkernels.hsim_split_linear(x.reshape(-1, x.shape[-1]), mix_weight, mix_bias, block_weight,
                                               block_bias)
    return y.reshape(x.shape)

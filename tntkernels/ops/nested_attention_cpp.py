"""Registration of the compiled nested-logit attention ops (C++ CPU, CUDA C++) and a Python entry.

Compiled op schemas (csrc/tntkernels.cpp):
    nested_attention(Tensor q, Tensor k, Tensor v, Tensor? prev_logits, Tensor[] head_mlp, Tensor? noise,
                     float scale) -> (Tensor out, Tensor logits, Tensor lse)
    nested_attention_backward(Tensor grad_out, Tensor? grad_logits, Tensor q, Tensor k, Tensor v,
                              Tensor? prev_logits, Tensor[] head_mlp, Tensor out, Tensor logits, Tensor lse,
                              float scale) -> Tensor[]
head_mlp is [] (RealFormer form) or (w1, b1, w2, b2, w3, b3) (CODA form); the MLP is used only when
prev_logits is given. lse (B, H, T) is float32 (float64 for float64 inputs) and carries no gradient.
The backward returns [dq, dk, dv, dprev] (dprev empty when prev_logits is None) and then the six MLP
gradients when the MLP was used. Semantics: `nested_attention_ref` in nested_attention.py.

The CUDA kernels support float32 / float16 / bfloat16 with T <= 64, H <= 16, d, dv <= 64.
"""
from __future__ import annotations

import torch

from .. import _backend
from .nested_attention import nested_attention_ref

CUDA_MAX_TOKENS = 64
CUDA_MAX_HEADS = 16
CUDA_MAX_HEAD_DIM = 64


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mlp_used(prev_logits, head_mlp) -> bool:
    return prev_logits is not None and len(head_mlp) == 6


def _setup_context(ctx, inputs, output):
    q, k, v, prev_logits, head_mlp, noise, scale = inputs
    out, logits, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.has_prev = prev_logits is not None
    ctx.n_mlp = len(head_mlp)
    ctx.has_noise = noise is not None
    saved = [q, k, v, out, logits, lse] + ([prev_logits] if prev_logits is not None else []) + list(head_mlp)
    if noise is not None:
        saved.append(noise)  # only for double backward through the reference
    ctx.save_for_backward(*saved)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_logits, grad_lse):
    saved = list(ctx.saved_tensors)
    q, k, v, out, logits, lse = saved[:6]
    rest = saved[6:]
    prev = rest.pop(0) if ctx.has_prev else None
    head_mlp = [rest.pop(0) for _ in range(ctx.n_mlp)]
    noise = rest.pop(0) if ctx.has_noise else None
    mlp_used = _mlp_used(prev, head_mlp)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if torch.is_grad_enabled():
        # create_graph=True (double backward): differentiate the reference so second-order grads are exact.
        inputs = [q, k, v] + ([prev] if prev is not None else []) + (head_mlp if mlp_used else [])
        ref_out, ref_z = nested_attention_ref(q, k, v, prev, tuple(head_mlp) if ctx.n_mlp == 6 else None,
                                              noise, ctx.scale)
        outs, grads_in = [ref_out], [grad_out]
        if grad_logits is not None:
            outs.append(ref_z)
            grads_in.append(grad_logits)
        need = [i for i, t in enumerate(inputs) if t.requires_grad]
        got = torch.autograd.grad(outs, [inputs[i] for i in need], grads_in, create_graph=True, allow_unused=True)
        grads = [None] * len(inputs)
        for i, g in zip(need, got):
            grads[i] = g
    else:
        if logits.dtype in (torch.float16, torch.bfloat16):
            # The kernels rebuild P = exp(logits − lse) from the logits saved in q's dtype, while the
            # forward's lse is that of the unrounded float32 logits: P's rows then miss 1 by
            # ~eps·|Z|, dZ = P ∘ (dP − rowsum(P ∘ dP)) no longer sums to 0 over the keys, and dq / dk
            # err by ~eps·|Z|·|rowsum| (bf16, |Z| ~ 10, v rows sharing a common part: dq ~100% off,
            # 20× PyTorch's error; found by tests/test_fuzz.py). The lse of the saved logits makes P
            # exactly softmax(saved Z), as the reference's backward in this dtype.
            lse = torch.logsumexp(logits.float(), dim=-1)
        res = torch.ops.tntkernels.nested_attention_backward(
            grad_out.contiguous(), None if grad_logits is None else grad_logits.contiguous(),
            q, k, v, prev, head_mlp, out, logits, lse, ctx.scale)
        grads = list(res[:3]) + ([res[3]] if prev is not None else []) + (list(res[4:10]) if mlp_used else [])
    dq, dk, dv = grads[:3]
    dprev = grads[3] if prev is not None else None
    if ctx.n_mlp == 0:
        dmlp = []
    elif mlp_used:
        dmlp = grads[4:10] if prev is not None else []
    else:
        dmlp = [None] * ctx.n_mlp
    return dq, dk, dv, dprev, dmlp, None, None


if _backend.cpp_available():
    @torch.library.register_fake("tntkernels::nested_attention")
    def _nested_attention_fake(q, k, v, prev_logits, head_mlp, noise, scale):
        B, H, T, _ = q.shape
        return (q.new_empty((B, H, T, v.shape[-1])), q.new_empty((B, H, T, T)),
                q.new_empty((B, H, T), dtype=_lse_dtype(q.dtype)))

    @torch.library.register_fake("tntkernels::nested_attention_backward")
    def _nested_attention_backward_fake(grad_out, grad_logits, q, k, v, prev_logits, head_mlp, out, logits, lse,
                                        scale):
        res = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
               prev_logits.new_empty(prev_logits.shape) if prev_logits is not None else q.new_empty((0,))]
        if _mlp_used(prev_logits, head_mlp):
            res += [w.new_empty(w.shape) for w in head_mlp]
        return res

    torch.library.register_autograd("tntkernels::nested_attention", _backward, setup_context=_setup_context)


def nested_attention_compiled(q, k, v, prev_logits=None, head_mlp=None, noise=None, scale=None):
    """Nested-logit attention through the compiled op (CPU C++ or CUDA C++ by q's device).

    Args as `nested_attention_ref`: q, k (B, H, T, d); v (B, H, T, dv); prev_logits, noise None or
    (B, H, T, T); head_mlp None or the six CODA tensors; scale default d ** -0.5.
    Returns (out (B, H, T, dv), logits (B, H, T, T)), differentiable in q, k, v, prev_logits and the
    MLP tensors (not in noise).
    Raises RuntimeError when tntkernels._C is not built, or (from the op) on bad inputs / sizes the
    CUDA kernels do not support.
    """
    if not _backend.cpp_available():
        raise RuntimeError(f"nested_attention_compiled: tntkernels._C is not built ({_backend._C_ERROR})")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mlp = [] if head_mlp is None else list(head_mlp)
    out, logits, _ = torch.ops.tntkernels.nested_attention(q, k, v, prev_logits, mlp, noise, float(scale))
    return out, logits

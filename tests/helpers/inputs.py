"""Input builders shared by every test of an op family (reference, C++, CUDA C++, Triton, fuzz-free
tests): random tensors drawn in float64 from a fixed seed, then cast, in the layouts the kernels
must accept.

Layouts: "c" contiguous; "t" transposed buffers ((S, m, H, ·) viewed as (S, H, m, ·)); "qkv" permuted
views of one Linear output (S, m, 3·H·d), like timm's Attention (attention only, d == dv);
"s" a slice of a wider buffer (H_sim-split only).
"""
from __future__ import annotations

import torch


class Draw:
    """torch.randn / torch.rand from one seeded generator, in float64, cast to `dtype` / `device`."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float64, device="cpu"):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype, self.device = dtype, device

    def randn(self, *shape, std: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.g, dtype=torch.float64) * std
        return t.to(device=self.device, dtype=self.dtype)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g)


def attention_inputs(S, H, m, d, dv=None, *, layout="c", dtype=torch.float64, device="cpu", seed=0):
    """q, k (S, H, m, d), v (S, H, m, dv) and an upstream gradient dout (S, H, m, dv)."""
    dv = d if dv is None else dv
    r = Draw(seed, dtype, device)
    if layout == "qkv":
        assert d == dv, "the qkv layout needs d == dv"
        q, k, v = r.randn(S, m, 3 * H * d).reshape(S, m, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "t":
        q, k = r.randn(2, S, m, H, d).transpose(2, 3).unbind(0)
        v = r.randn(S, m, H, dv).transpose(1, 2)
    else:
        q, k = r.randn(2, S, H, m, d).unbind(0)
        v = r.randn(S, H, m, dv)
    return q, k, v, r.randn(S, H, m, dv)


def head_mlp(r: Draw, H: int) -> list[torch.Tensor]:
    """CODA's six head-MLP tensors (w1 (4H, H), b1, w2 (4H, 4H), b2, w3 (H, 4H), b3), scaled so the
    logits stay O(1)."""
    F = 4 * H
    return [r.randn(F, H, std=H ** -0.5), r.randn(F, std=0.1), r.randn(F, F, std=F ** -0.5), r.randn(F, std=0.1),
            r.randn(H, F, std=F ** -0.5), r.randn(H, std=0.1)]


def nested_inputs(B, H, T, d, dv=None, *, form="coda", prev=True, noise=False, layout="c", dtype=torch.float64,
                  device="cpu", seed=0):
    """q, k, v, prev_logits, head_mlp, noise, grad_out, grad_logits for nested attention.

    form: "coda" (with the head-MLP) or "realformer" (without); prev: False / None (first layer,
    no prev_logits), True, "mask" (30% of the keys −inf in every head, never a whole row), "first"
    (the whole first 16-key tile −inf: an online softmax starts from −inf rows) or "one" (one −inf
    logit, at (0, 1) of every (b, h))."""
    dv = d if dv is None else dv
    r = Draw(seed, dtype, device)
    if layout == "t":
        q, k = r.randn(2, B, T, H, d).transpose(2, 3).unbind(0)
        v = r.randn(B, T, H, dv).transpose(1, 2)
    else:
        q, k = r.randn(2, B, H, T, d).unbind(0)
        v = r.randn(B, H, T, dv)
    prev_logits = r.randn(B, H, T, T) if prev else None
    if prev in ("mask", "first", "one"):
        drop = torch.zeros(B, 1, T, T, dtype=torch.bool)
        if prev == "mask":
            drop = r.rand(B, 1, T, T) < 0.3
            drop[..., 0] = False
        elif prev == "first":
            drop[..., :16] = True
        elif T > 1:
            drop[..., 0, 1] = True
        prev_logits = prev_logits.masked_fill(drop.to(prev_logits.device), float("-inf"))
    mlp = head_mlp(r, H) if form == "coda" else None
    noise_t = r.randn(B, H, T, T) if noise else None
    return q, k, v, prev_logits, mlp, noise_t, r.randn(B, H, T, dv), r.randn(B, H, T, T, std=0.5)


def hsim_inputs(lead, H, d, *, parts="mb", biases=True, layout="c", dtype=torch.float64, device="cpu", seed=0):
    """x (*lead, H·d), (M, m, A, a) (None for the parts not in `parts`: "m" mix, "b" block; biases
    only with `biases`) and an upstream gradient (*lead, H·d)."""
    r = Draw(seed, dtype, device)
    D = H * d
    if layout == "t" and len(lead) == 2:
        x = r.randn(*lead[::-1], D).transpose(0, 1)
    elif layout == "s":
        x = r.randn(*lead, D + 5)[..., 3:3 + D]
    else:
        x = r.randn(*lead, D)
    M = r.randn(d, H, H, std=H ** -0.5) if "m" in parts else None
    m = r.randn(d, H, std=0.5) if "m" in parts and biases else None
    A = r.randn(H, d, d, std=d ** -0.5) if "b" in parts else None
    a = r.randn(H, d, std=0.5) if "b" in parts and biases else None
    return x, (M, m, A, a), r.randn(*lead, D)


def inner_block_inputs(S, m, C, H, *, hidden=None, qkv_bias=False, drop_path=False, layout="c",
                       dtype=torch.float64, device="cpu", seed=0):
    """x (S, m, C), params (timm names; LayerNorm weights near 1, small biases), dy (S, m, C) and the
    drop-path scales (None, or (s_attn, s_mlp): 0 or 1/0.75 per sentence)."""
    from tntkernels.ops.reference.inner_block import OPTIONAL_PARAMS, param_shapes

    r = Draw(seed, dtype, device)
    params = {}
    for name, shape in param_shapes(C, hidden or 4 * C).items():
        if name in OPTIONAL_PARAMS and not qkv_bias:
            continue
        t = torch.randn(shape, generator=r.g, dtype=torch.float64) * (C ** -0.5 if len(shape) == 2 else 0.1)
        if name.startswith("norm") and name.endswith("weight"):
            t = t + 1.0
        params[name] = t.to(device=device, dtype=dtype)
    x = r.randn(m, S, C).transpose(0, 1) if layout == "t" else r.randn(S, m, C)
    dy = r.randn(S, m, C)
    scales = None
    if drop_path:
        scales = tuple(((r.rand(S) < 0.75).float() / 0.75).to(device) for _ in range(2))
    return x, params, dy, scales

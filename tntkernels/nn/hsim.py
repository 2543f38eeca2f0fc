"""TinT's H_sim-split linear layer as a drop-in module (docs/tint.md §1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.hsim_split_linear import hsim_split_linear
from ._checks import check_backend, check_is_tensor, is_positive_int

_PARTS = ("mix+block", "mix", "block")


class HsimSplitLinear(nn.Module):
    """y = Block(Mix(x)) on x (..., dim), dim = num_heads · head_dim: TinT's structured stand-in for
    a dim × dim nn.Linear, with dH² + dH (mix) + d²H + dH (block) = D²/H + D·H (+ 2D) weights.

        mix:    z[n, g, k] = Σ_h x[n, h, k] · mix_weight[k, h, g] + mix_bias[k, g]
        block:  y[n, g, :] = z[n, g, :] @ block_weight[g] + block_bias[g]

    Args:
        dim: D, the input and output width.  num_heads: H_sim; head_dim d = D / H.
        bias: learnable mix_bias / block_bias.
        parts: "mix+block" (TinT's Q/K/V projections), "mix" or "block" (output projections, MLPs).
        backend: forwarded to `tntkernels.hsim_split_linear` (None = best available).
    Parameters: mix_weight (d, H, H), mix_bias (d, H), block_weight (H, d, d), block_bias (H, d),
        for the parts present. Init: uniform(±1/√fan_in) as nn.Linear, fan_in = H (mix) or d (block).
    Raises:
        ValueError: dim or num_heads not a positive int, dim not divisible by num_heads, an unknown
            `parts` or backend; x not (..., dim). TypeError: x not a tensor.
    Source: Panigrahi et al., "Trainable Transformer in Transformer", arXiv 2307.01189, §3.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True, parts: str = "mix+block",
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if not (is_positive_int(dim) and is_positive_int(num_heads)) or dim % num_heads:
            raise ValueError(f"HsimSplitLinear: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if parts not in _PARTS:
            raise ValueError(f"HsimSplitLinear: parts must be one of {_PARTS}, got {parts!r}")
        check_backend("HsimSplitLinear", backend)
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim, self.parts, self.backend = dim, num_heads, dim // num_heads, parts, backend
        H, d = num_heads, self.head_dim
        has_mix, has_block = "mix" in parts, "block" in parts
        self.mix_weight = nn.Parameter(torch.empty(d, H, H, **dd)) if has_mix else None
        self.mix_bias = nn.Parameter(torch.empty(d, H, **dd)) if has_mix and bias else None
        self.block_weight = nn.Parameter(torch.empty(H, d, d, **dd)) if has_block else None
        self.block_bias = nn.Parameter(torch.empty(H, d, **dd)) if has_block and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight, b, fan_in in ((self.mix_weight, self.mix_bias, self.num_heads),
                                  (self.block_weight, self.block_bias, self.head_dim)):
            bound = 1 / math.sqrt(fan_in)
            for t in (weight, b):
                if t is not None:
                    nn.init.uniform_(t, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) → (..., dim), x's dtype (parameters cast to it, e.g. under autocast)."""
        check_is_tensor("HsimSplitLinear", x=x)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"HsimSplitLinear: x must be (..., {self.dim}), got {tuple(x.shape)}")
        params = [p.to(x.dtype) if p is not None else None
                  for p in (self.mix_weight, self.mix_bias, self.block_weight, self.block_bias)]
        return hsim_split_linear(x, *params, backend=self.backend)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """The equivalent nn.Linear(dim, dim): weight[(g, j), (h, k)] = mix_weight[k, h, g] ·
        block_weight[g][k, j] (composite; identity parts when absent), bias = this module at x = 0."""
        p = self.mix_weight if self.mix_weight is not None else self.block_weight
        eye = torch.eye(self.dim, device=p.device, dtype=p.dtype)
        params = (self.mix_weight, self.mix_bias, self.block_weight, self.block_bias)
        y0 = hsim_split_linear(torch.zeros_like(eye[:1]), *params, backend="reference")  # (1, D): the bias
        w = hsim_split_linear(eye, *params, backend="reference") - y0  # (D, D): row i = image of e_i
        linear = nn.Linear(self.dim, self.dim, bias=True, device=p.device, dtype=p.dtype)
        linear.weight.copy_(w.t())
        linear.bias.copy_(y0[0])
        return linear

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, num_heads: int, strict: bool = True,
                    backend: str | None = None) -> HsimSplitLinear:
        """A block-only HsimSplitLinear holding the H diagonal d × d blocks of a square nn.Linear:
        block_weight[g] = linear.weight[g·d:(g+1)·d, g·d:(g+1)·d]ᵀ, block_bias[g] = linear.bias[g·d:(g+1)·d].

        Raises:
            ValueError: the layer is not square, dim is not divisible by num_heads, or (strict) the
                weight has nonzero entries off the block diagonal (the result would not be equivalent).
        """
        out_f, in_f = linear.weight.shape
        if out_f != in_f:
            raise ValueError(f"HsimSplitLinear.from_linear: needs a square nn.Linear, got {out_f} × {in_f}")
        dense = linear.weight
        module = cls(in_f, num_heads, bias=linear.bias is not None, parts="block", backend=backend,
                     device=dense.device, dtype=dense.dtype)
        H, d = num_heads, module.head_dim
        blocks = dense.reshape(H, d, H, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (H, d_out, d_in)
        if strict:
            off = dense.reshape(H, d, H, d).clone()
            off.diagonal(dim1=0, dim2=2).zero_()
            if off.abs().max() > 0:
                raise ValueError("HsimSplitLinear.from_linear: the weight is not block-diagonal over "
                                 f"{H} heads of {d}; pass strict=False to keep only the diagonal blocks")
        module.block_weight.copy_(blocks.transpose(1, 2))
        if linear.bias is not None:
            module.block_bias.copy_(linear.bias.reshape(H, d))
        return module

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, parts={self.parts!r}, "
                f"bias={self.block_bias is not None or self.mix_bias is not None}")

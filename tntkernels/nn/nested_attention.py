"""Nested-logit multi-head attention (CODA / RealFormer / Nested-TNT) as a TNT-style module."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backend
from ..ops import registry
from ..ops.nested_attention import nested_attention, nested_attention_ref
from ._checks import check_is_tensor, check_positive_int
from .attention import Attention


def nested_route(backend: str | None, q: torch.Tensor, v: torch.Tensor, has_mlp: bool = True) -> str | None:
    """The backend `NestedAttention` gives `tntkernels.nested_attention` for q (B, H, N, d), v (B, H, N, dv).

    A named kernel backend that does not cover the shape (the CUDA C++ kernels stop at N = 64: TNT's
    outer level has 197 or 577 tokens) falls back to the Triton kernels when they cover it, else to the
    reference. There is no SDPA route: the logits carried between layers are the point of the op.
    None and "reference" pass through; a backend unavailable on q's device is not rerouted (it raises).
    """
    if backend in (None, "reference"):
        return backend
    device = q.device
    if registry.why_not("nested_attention", backend, device, q, v, has_mlp) is None or _backend.why_unavailable(backend, device):
        return backend  # covered, or not available on this device at all: nested_attention says why
    if backend != "triton" and registry.why_not("nested_attention", "triton", device, q, v, has_mlp) is None:
        return "triton"
    return "reference"


@torch.fx.wrap
def nested_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prev_logits: torch.Tensor | None,
                          head_mlp: tuple[torch.Tensor, ...] | None, scale: float, backend: str | None, *,
                          noise: bool, attn_drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`NestedAttention`'s attention on q, k (B, H, N, d), v (B, H, N, dv): (out (B, H, N, dv), logits).

    prev_logits (B, H, N, N) or None and the head-MLP tensors are cast to q's dtype; noise=True adds
    ε ~ N(0, 1) drawn here; attn_drop > 0 runs the reference with dropout on the probabilities; else
    `nested_attention` with the backend `nested_route` picks. One graph call under torch.fx
    (`torch.fx.wrap`): the checks and the route need real shapes, dtypes and devices, which a Proxy
    does not have, so they run when the traced module runs.
    Raises TypeError / ValueError when prev_logits is not a (B, H, N, N) tensor."""
    B, H, N, _ = q.shape
    if prev_logits is not None:
        check_is_tensor("NestedAttention", prev_logits=prev_logits)
        if tuple(prev_logits.shape) != (B, H, N, N):
            raise ValueError(f"NestedAttention: prev_logits must be (B, H, N, N) = {(B, H, N, N)}, "
                             f"got {tuple(prev_logits.shape)}")
        prev_logits = prev_logits.to(q.dtype)
    if head_mlp is not None:
        head_mlp = tuple(t.to(q.dtype) for t in head_mlp)
    eps = torch.randn(B, H, N, N, device=q.device, dtype=q.dtype) if noise else None
    if attn_drop > 0:
        _, logits = nested_attention_ref(q, k, v, prev_logits, head_mlp, eps, scale)
        return F.dropout(logits.softmax(dim=-1), attn_drop, training=True) @ v, logits
    route = nested_route(backend, q, v, prev_logits is not None and head_mlp is not None)
    return nested_attention(q, k, v, prev_logits, head_mlp=head_mlp, noise=eps, scale=scale, backend=route)


class HeadMlp(nn.Module):
    """CODA's MLP over the head axis: Linear(H, 4H) → LeakyReLU(0.2) → Linear(4H, 4H) → LeakyReLU(0.2)
    → Linear(4H, H) (keys fc1, fc2, fc3). Init as CODA: xavier_uniform with gain 1/√2, zero biases.
    Its weights are applied by the attention kernels; this module only holds them."""

    def __init__(self, num_heads: int, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        check_positive_int("HeadMlp", num_heads=num_heads)
        H = num_heads
        self.fc1 = nn.Linear(H, 4 * H, **dd)
        self.fc2 = nn.Linear(4 * H, 4 * H, **dd)
        self.fc3 = nn.Linear(4 * H, H, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2, self.fc3):
            nn.init.xavier_uniform_(fc.weight, gain=1 / math.sqrt(2))
            nn.init.zeros_(fc.bias)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(w1, b1, w2, b2, w3, b3) as `tntkernels.nested_attention(head_mlp=...)` takes them."""
        return (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.fc3.weight, self.fc3.bias)


class NestedAttention(Attention):
    """TNT attention whose pre-softmax logits are passed to the next layer and added there.

    Args:
        dim: input and output width C.  hidden_dim: width of q and k (num_heads × head_dim); v keeps
            width `dim` (timm TNT Attention layout: keys `qk`, `v`, `proj`).
        num_heads: H.  qkv_bias: bias in `qk` and `v`.
        head_mlp: True (CODA / Nested-TNT: a head-mixing MLP `head_mlp.fc1..fc3` on the summed
            logits) or False (RealFormer: logits are just added).
        noise: add ε ~ N(0, 1) to the logits in train() (CODA); drawn from torch's default
            generator for the device (so `torch.manual_seed` makes it repeatable); off in eval().
        attn_drop, proj_drop: dropouts (attn_drop > 0 in training runs the reference path).
        backend: forwarded to `tntkernels.nested_attention`; per call, a shape the named kernel backend
            does not cover runs on the Triton kernels, else the reference (`nested_route`).
    Shapes:
        forward(x (B, N, C), prev_logits None or (B, H, N, N)) → (out (B, N, C), logits (B, H, N, N)),
        x's dtype; `logits` is what the next layer takes as prev_logits (layer 1: None).
    Raises:
        ValueError: dim, hidden_dim or num_heads not a positive int; dim / hidden_dim not divisible
            by num_heads; an unknown backend; x not (B, N, dim); prev_logits not (B, H, N, N).
        TypeError: x or prev_logits not a tensor.
    Source: Zheng et al. 2021 (CODA), Eq. 6-8; Liu et al. 2024 (Nested-TNT); He et al. 2021 (RealFormer).
    """

    def __init__(self, dim: int, hidden_dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 head_mlp: bool = True, noise: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 device=None, dtype=None, backend: str | None = None):
        self._with_head_mlp = head_mlp
        super().__init__(dim, hidden_dim, num_heads, qkv_bias, attn_drop, proj_drop, device=device, dtype=dtype,
                         backend=backend)
        self.noise = noise

    def _init_logit_modules(self, dd: dict) -> None:
        self.head_mlp = HeadMlp(self.num_heads, **dd) if self._with_head_mlp else None

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor | None = None):
        q, k, v = self._heads(x)
        head_mlp = self.head_mlp.tensors() if self.head_mlp is not None else None
        out, logits = nested_attention_core(q, k, v, prev_logits, head_mlp, self.scale, self.backend,
                                            noise=self.training and self.noise,
                                            attn_drop=self.attn_drop.p if self.training else 0.0)
        return self._merge_heads(out), logits

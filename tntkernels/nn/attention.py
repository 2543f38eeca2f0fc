"""Drop-in multi-head attention for TNT (timm `timm.models.tnt.Attention`), on our kernels."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..ops import registry
from ..ops.inner_attention import inner_attention, inner_attention_ref
from ._checks import check_backend, check_is_tensor, check_positive_int

# The longest sequence nn.Attention gives to the package's attention kernels. They are built for the
# inner level of TNT (16 words per sentence) and RTNT (4 letters per word): many short sequences with
# a tiny head_dim. Longer sequences (TNT's outer level: 197 or 577 sentence tokens, head_dim 64) are
# FlashAttention's home ground, and go to F.scaled_dot_product_attention.
MAX_KERNEL_TOKENS = 64


def attention_route(backend: str | None, q: torch.Tensor, v: torch.Tensor) -> str | None:
    """What `Attention` runs for q (B, H, N, d), v (B, H, N, dv) when asked for `backend`.

    Returns "reference" (asked for), "sdpa" (`F.scaled_dot_product_attention`: N > MAX_KERNEL_TOKENS,
    or the named kernel backend does not cover the shape or dtype, e.g. "triton" with head_dim > 64
    or float64), else `backend` itself for `tntkernels.inner_attention` (None: the registry's choice).
    A named backend that cannot run on q's device at all is not rerouted: inner_attention raises.
    Meta tensors (shape inference) go to "sdpa" whatever the backend.
    """
    if backend == "reference":
        return "reference"
    if q.is_meta:
        return "sdpa"  # shape inference only (a model built on the meta device): no kernel to choose
    if q.shape[-2] > MAX_KERNEL_TOKENS:
        return "sdpa"
    if backend is not None and registry.OPS["inner_attention"].unsupported.get(backend, lambda *a: None)(q, v):
        return "sdpa"
    return backend


@torch.fx.wrap
def check_attention_input(owner: str, dim: int, x: torch.Tensor, what: str = "x") -> torch.Tensor:
    """x must be a (B, N, dim) tensor, else TypeError / ValueError; returns x.

    A module-level function recorded as one graph call by torch.fx (`torch.fx.wrap`): under
    `symbolic_trace` x is a Proxy with no shape, so the check runs when the traced module runs, on
    its real input (it returns x so that dead-code elimination keeps it in the graph)."""
    check_is_tensor(owner, **{what: x})
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{owner}: {what} must be (B, N, {dim}), got {tuple(x.shape)}")
    return x


@torch.fx.wrap
def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   backend: str | None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q, k (B, H, N, d), v (B, H, N, dv), routed by `attention_route`.

    One graph call under torch.fx (`torch.fx.wrap`): the route depends on N, the dtype and the
    device, which a Proxy does not have, so it is chosen when the traced module runs."""
    route = attention_route(backend, q, v)
    if route == "reference":
        return inner_attention_ref(q, k, v, scale)
    if route == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return inner_attention(q, k, v, scale=scale, backend=route)  # (B, H, N, C/H)


class Attention(nn.Module):
    """TNT multi-head attention with timm's constructor and parameter names (`qk`, `v`, `proj`).

    Args:
        dim: input and output width C.
        hidden_dim: width of q and k (num_heads × head_dim); v keeps width `dim`.
        num_heads: heads H.
        qkv_bias: bias in `qk` and `v` (TNT: False).
        attn_drop: dropout on the attention probabilities; when > 0 and training, the reference
            path runs (our kernels have no dropout).
        proj_drop: dropout after `proj`.
        backend: forwarded to `tntkernels.inner_attention` (None = best available), per call, for
            sequences of at most MAX_KERNEL_TOKENS (64) tokens that the backend covers; longer
            sequences (TNT's outer level) and shapes the named kernel does not cover run
            `F.scaled_dot_product_attention` (`attention_route`). "reference" always runs the reference.
    Shapes:
        forward(x): x (B, N, C) → (B, N, C), x's dtype. For TNT's inner level B = batch × sentences,
        N = words; for the outer level B = batch, N = sentences + 1.
    Raises:
        ValueError: dim, hidden_dim or num_heads not a positive int; dim or hidden_dim not divisible
            by num_heads; an unknown backend; x not (B, N, dim).
        TypeError: x not a tensor.
    Source: Han et al. 2021 (TNT), Eq. 1 (docs/tnt-family.md §1).
    """

    def __init__(self, dim: int, hidden_dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None, backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, dim=dim, hidden_dim=hidden_dim, num_heads=num_heads)
        check_backend(name, backend)
        if hidden_dim % num_heads or dim % num_heads:
            raise ValueError(f"{name}: dim={dim} and hidden_dim={hidden_dim} must be divisible by "
                             f"num_heads={num_heads}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qk = nn.Linear(dim, hidden_dim * 2, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self._init_logit_modules(dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _init_logit_modules(self, dd: dict) -> None:
        """Modules acting on the logits, built between `v` and `proj` (subclasses; none here)."""

    def _heads(self, x: torch.Tensor, what: str = "x") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks x (B, N, C) and projects it: q, k (B, H, N, head_dim), v (B, H, N, C/H), views."""
        x = check_attention_input(type(self).__name__, self.v.in_features, x, what)
        B, N, C = x.shape
        H = self.num_heads
        q, k = self.qk(x).reshape(B, N, 2, H, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        v = self.v(x).reshape(B, N, H, self.v.out_features // H).permute(0, 2, 1, 3)  # (B, H, N, C/H)
        return q, k, v

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, C/H) → proj → (B, N, C)."""
        B, H, N, dv = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, H * dv)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        if self.training and self.attn_drop.p > 0:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
            out = self.attn_drop(attn) @ v
        else:
            out = attention_core(q, k, v, self.scale, self.backend)  # (B, H, N, C/H)
        return self._merge_heads(out)

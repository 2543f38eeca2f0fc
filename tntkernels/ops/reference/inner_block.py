"""Reference TNT inner (word-level) sub-block, and the parameter layout shared by its kernels.

    y = x1 + s_mlp · fc2(GELU(fc1(LN_mlp(x1)))),   x1 = x + s_attn · proj(MHA(LN_in(x)))

over the m words of each of S sentences (Han et al. 2021, TNT, Eq. 6-7; timm `tnt.Block`, lines
`pixel_embed + drop_path(attn_in(norm_in(·)))` and `+ drop_path(mlp_in(norm_mlp_in(·)))`). s_attn and
s_mlp are optional per-sentence drop-path scales (mask / keep_prob, as DropPath draws them).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

# timm TNT Block names of the inner sub-block's parameters, in the order the kernels take them.
PARAM_NAMES = (
    "norm_in.weight", "norm_in.bias",
    "attn_in.qk.weight", "attn_in.qk.bias", "attn_in.v.weight", "attn_in.v.bias",
    "attn_in.proj.weight", "attn_in.proj.bias",
    "norm_mlp_in.weight", "norm_mlp_in.bias",
    "mlp_in.fc1.weight", "mlp_in.fc1.bias", "mlp_in.fc2.weight", "mlp_in.fc2.bias",
)
OPTIONAL_PARAMS = ("attn_in.qk.bias", "attn_in.v.bias")  # TNT: qkv_bias=False
# LayerNorm parameters: float32 in the kernels, as LayerNorm runs in float32 under CUDA autocast
LN_PARAMS = ("norm_in.weight", "norm_in.bias", "norm_mlp_in.weight", "norm_mlp_in.bias")


def param_shapes(C: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm_in.weight": (C,), "norm_in.bias": (C,),
        "attn_in.qk.weight": (2 * C, C), "attn_in.qk.bias": (2 * C,),
        "attn_in.v.weight": (C, C), "attn_in.v.bias": (C,),
        "attn_in.proj.weight": (C, C), "attn_in.proj.bias": (C,),
        "norm_mlp_in.weight": (C,), "norm_mlp_in.bias": (C,),
        "mlp_in.fc1.weight": (hidden, C), "mlp_in.fc1.bias": (hidden,),
        "mlp_in.fc2.weight": (C, hidden), "mlp_in.fc2.bias": (C,),
    }


def eps_pair(eps) -> tuple[float, float]:
    pair = isinstance(eps, (tuple, list))
    if pair and len(eps) != 2:
        raise ValueError(f"inner_block: eps must be one float or a pair (eps_in, eps_mlp), got {len(eps)} values")
    try:
        values = tuple(eps) if pair else (eps, eps)
        if any(isinstance(e, (str, bytes)) for e in values):
            raise TypeError
        eps_in, eps_mlp = (float(e) for e in values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"inner_block: eps must be a float or a pair of floats (eps_in, eps_mlp), "
                        f"got {eps!r}") from None
    for e in (eps_in, eps_mlp):
        if not (e > 0 and e != float("inf")):
            raise ValueError(f"inner_block: LayerNorm eps must be a positive finite float, got {eps!r}")
    return eps_in, eps_mlp


def inner_block_ref(x: torch.Tensor, params: Mapping[str, torch.Tensor | None], *, num_heads: int,
                    eps: float | tuple[float, float] = 1e-5,
                    drop_path_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Reference TNT inner sub-block in plain PyTorch, computed as timm does (softmax in x's dtype).

    Args:
        x: (S, m, C) word tokens of S sentences, any floating dtype.
        params: timm names (`PARAM_NAMES`, relative to a TNT Block) → tensors in x's dtype;
            "attn_in.qk.bias" / "attn_in.v.bias" may be missing or None.
        num_heads: H; head_dim = C / H, scale head_dim ** -0.5.
        eps: LayerNorm eps, one float for both norms or (eps_in, eps_mlp).
        drop_path_scales: None or (s_attn, s_mlp), each (S,): per-sentence factor on each residual
            branch (DropPath's mask / keep_prob).
    Returns:
        (S, m, C) in x's dtype.
    """
    eps_in, eps_mlp = eps_pair(eps)
    S, m, C = x.shape
    H = num_heads
    d = C // H
    p = params
    h = F.layer_norm(x, (C,), p["norm_in.weight"], p["norm_in.bias"], eps_in)
    q, k = F.linear(h, p["attn_in.qk.weight"], p.get("attn_in.qk.bias")).reshape(S, m, 2, H, d).permute(
        2, 0, 3, 1, 4).unbind(0)  # (S, H, m, d)
    v = F.linear(h, p["attn_in.v.weight"], p.get("attn_in.v.bias")).reshape(S, m, H, d).transpose(1, 2)
    o = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(dim=-1) @ v  # (S, H, m, d)
    a = F.linear(o.transpose(1, 2).reshape(S, m, C), p["attn_in.proj.weight"], p["attn_in.proj.bias"])
    if drop_path_scales is not None:
        a = a * drop_path_scales[0].to(a.dtype)[:, None, None]
    x = x + a
    h = F.layer_norm(x, (C,), p["norm_mlp_in.weight"], p["norm_mlp_in.bias"], eps_mlp)
    h = F.linear(F.gelu(F.linear(h, p["mlp_in.fc1.weight"], p["mlp_in.fc1.bias"])),
                 p["mlp_in.fc2.weight"], p["mlp_in.fc2.bias"])
    if drop_path_scales is not None:
        h = h * drop_path_scales[1].to(h.dtype)[:, None, None]
    return x + h

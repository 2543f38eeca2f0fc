"""Drop-in TNT block (timm `timm.models.tnt.Block`): inner (word) and outer (sentence) transformers."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from ..ops.inner_block import fused_available, inner_block
from ._checks import check_is_tensor, check_positive_int
from .attention import Attention
from .layers import DropPath, Mlp


def _plain_layer_norm(m: nn.Module, C: int) -> bool:
    return (type(m) is nn.LayerNorm and tuple(m.normalized_shape) == (C,) and m.weight is not None
            and m.bias is not None)


def _inactive(dropout: nn.Module) -> bool:
    return not dropout.training or float(getattr(dropout, "p", 0.0)) == 0.0


def _drop_path_scale(drop_path: nn.Module, S: int, device: torch.device) -> torch.Tensor | None:
    """DropPath's per-sample factor (mask / keep_prob) as an (S,) float32 tensor; None when inactive."""
    if isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0:
        keep = 1.0 - drop_path.drop_prob
        return torch.empty(S, device=device, dtype=torch.float32).bernoulli_(keep).div_(keep)
    return None


def fused_inner_sublayer(x: torch.Tensor, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module,
                         drop_path: nn.Module) -> torch.Tensor | None:
    """x + drop_path(attn(norm1(x))), then + drop_path(mlp(norm2(·))), through the fused Triton kernel
    `tntkernels.ops.inner_block.inner_block` when it applies, else None (run the modules).

    It applies when `attn.backend` (or TNTKERNELS_BACKEND, for None) resolves to the fused kernel
    for x, the modules are the plain ones (nn.LayerNorm with affine, our Attention with
    hidden_dim = C and the default scale, an MLP fc1 → exact GELU → fc2 with biases), dropout is
    off (p = 0 or eval), and DropPath is ours or Identity. Under autocast the parameters and GEMMs
    use the autocast dtype and the residual stream keeps x's dtype, as autocast itself would.
    """
    # Not a real tensor (an fx Proxy while tracing: the traced graph runs the modules) or a meta tensor
    # (shape inference for a model built on the meta device, e.g. for FSDP: there is nothing to fuse, and
    # the autocast query below has no meta device type).
    if not isinstance(x, torch.Tensor) or x.is_meta:
        return None
    # exactly our Attention: a subclass (NestedAttention) also returns its logits, which the kernel has not
    if x.dim() != 3 or type(attn) is not Attention or not isinstance(drop_path, (DropPath, nn.Identity)):
        return None
    S, m, C = x.shape
    if attn.hidden_dim != C or attn.scale != attn.head_dim ** -0.5 or attn.qk.in_features != C:
        return None
    if not (_plain_layer_norm(norm1, C) and _plain_layer_norm(norm2, C)):
        return None
    if not (_inactive(attn.attn_drop) and _inactive(attn.proj_drop)):
        return None
    parts = [getattr(mlp, n, None) for n in ("fc1", "act", "drop1", "fc2", "drop2")]
    if any(p is None for p in parts) or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return None
    if (type(mlp.act) is not nn.GELU or mlp.act.approximate != "none" or mlp.fc1.bias is None
            or mlp.fc2.bias is None or not (_inactive(mlp.drop1) and _inactive(mlp.drop2))
            or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)):
        return None
    compute = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        compute = torch.get_autocast_dtype(x.device.type)
        if compute != x.dtype and x.dtype != torch.float32:
            return None
    if not fused_available(x, C, mlp.fc1.out_features, attn.num_heads, attn.backend, compute):
        return None
    params = {
        "norm_in.weight": norm1.weight, "norm_in.bias": norm1.bias,
        "attn_in.qk.weight": attn.qk.weight, "attn_in.qk.bias": attn.qk.bias,
        "attn_in.v.weight": attn.v.weight, "attn_in.v.bias": attn.v.bias,
        "attn_in.proj.weight": attn.proj.weight, "attn_in.proj.bias": attn.proj.bias,
        "norm_mlp_in.weight": norm2.weight, "norm_mlp_in.bias": norm2.bias,
        "mlp_in.fc1.weight": mlp.fc1.weight, "mlp_in.fc1.bias": mlp.fc1.bias,
        "mlp_in.fc2.weight": mlp.fc2.weight, "mlp_in.fc2.bias": mlp.fc2.bias,
    }
    s_attn = _drop_path_scale(drop_path, S, x.device)
    scales = None if s_attn is None else (s_attn, _drop_path_scale(drop_path, S, x.device))
    return inner_block(x, params, num_heads=attn.num_heads, eps=(norm1.eps, norm2.eps), drop_path_scales=scales,
                           compute_dtype=compute, backend="triton")


@torch.fx.wrap
def check_block_inputs(owner: str, num_pixel: int, dim: int, dim_out: int, pixel_embed: torch.Tensor,
                       patch_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_embed (B·N, m, c) and patch_embed (B, N + 1, d) for m = num_pixel, c = dim, d = dim_out,
    else TypeError / ValueError; returns both.

    A module-level function recorded as one graph call by torch.fx (`torch.fx.wrap`): under
    `symbolic_trace` the inputs are Proxies with no shapes, so the check runs when the traced module
    runs, on its real inputs (returning them keeps the call through dead-code elimination)."""
    check_is_tensor(owner, pixel_embed=pixel_embed, patch_embed=patch_embed)
    if patch_embed.dim() != 3 or patch_embed.shape[1] < 1 or patch_embed.shape[2] != dim_out:
        raise ValueError(f"{owner}: patch_embed must be (B, N + 1, d) with d = {dim_out}, got "
                         f"{tuple(patch_embed.shape)}")
    B, N1 = patch_embed.shape[0], patch_embed.shape[1]
    expected = (B * (N1 - 1), num_pixel, dim)
    if tuple(pixel_embed.shape) != expected:
        raise ValueError(f"{owner}: pixel_embed must be (B·N, m, c) = {expected} for patch_embed (B, N + 1, d) = "
                         f"{tuple(patch_embed.shape)}, got {tuple(pixel_embed.shape)}")
    return pixel_embed, patch_embed


class TNTBlock(nn.Module):
    """One TNT block with timm's constructor and parameter names.

    Args:
        dim: inner (word) width c.  dim_out: outer (sentence) width d.  num_pixel: words per
            sentence m.  num_heads_in / num_heads_out: heads of the inner / outer attention.
        mlp_ratio: outer MLP hidden = d · mlp_ratio (the inner MLP is always 4c, as in timm).
        qkv_bias, proj_drop, attn_drop, drop_path, act_layer, norm_layer: as timm.
        legacy: timm's legacy word→sentence projection (LN(c) → Linear(m·c, d, bias)).
        backend: forwarded to both attentions; the inner sub-block (norm_in → attn_in → norm_mlp_in →
            mlp_in) runs as one fused Triton kernel when the inner attention's backend resolves to
            "triton" and the kernel covers the shape (`fused_inner_sublayer`).
    Shapes:
        forward(pixel_embed (B·N, m, c), patch_embed (B, N + 1, d)) →
            (pixel_embed (B·N, m, c), patch_embed (B, N + 1, d)); the class token (index 0) gets no
            word contribution.
    Raises:
        ValueError: dim, dim_out or num_pixel not a positive int (or the attentions' checks);
            forward inputs not of those shapes. TypeError: a forward input not a tensor.
    Source: Han et al. 2021 (TNT), Eq. 6-10; timm `tnt.py` (names, layouts).
    """

    def __init__(self, dim: int, dim_out: int, num_pixel: int, num_heads_in: int = 4, num_heads_out: int = 12,
                 mlp_ratio: float = 4., qkv_bias: bool = False, proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, legacy: bool = False, device=None, dtype=None,
                 backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        check_positive_int(type(self).__name__, dim=dim, dim_out=dim_out, num_pixel=num_pixel)
        self.dim, self.dim_out, self.num_pixel = dim, dim_out, num_pixel
        self.norm_in = norm_layer(dim, **dd)
        self.attn_in = Attention(dim, dim, num_heads=num_heads_in, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                 proj_drop=proj_drop, backend=backend, **dd)
        self.norm_mlp_in = norm_layer(dim, **dd)
        self.mlp_in = Mlp(dim, int(dim * 4), dim, act_layer=act_layer, drop=proj_drop, **dd)
        self.legacy = legacy
        if legacy:
            self.norm1_proj = norm_layer(dim, **dd)
            self.proj = nn.Linear(dim * num_pixel, dim_out, bias=True, **dd)
            self.norm2_proj = None
        else:
            self.norm1_proj = norm_layer(dim * num_pixel, **dd)
            self.proj = nn.Linear(dim * num_pixel, dim_out, bias=False, **dd)
            self.norm2_proj = norm_layer(dim_out, **dd)
        self.norm_out = norm_layer(dim_out, **dd)
        self.attn_out = Attention(dim_out, dim_out, num_heads=num_heads_out, qkv_bias=qkv_bias,
                                  attn_drop=attn_drop, proj_drop=proj_drop, backend=backend, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm_mlp = norm_layer(dim_out, **dd)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), dim_out, act_layer=act_layer, drop=proj_drop, **dd)

    def check_inputs(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_embed (B·N, m, c) and patch_embed (B, N + 1, d) of this block's m, c and d, else ValueError;
        returns both (`check_block_inputs`: under torch.fx the check is a graph call on the real inputs)."""
        return check_block_inputs(type(self).__name__, self.num_pixel, self.dim, self.dim_out, pixel_embed, patch_embed)

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor):
        pixel_embed, patch_embed = self.check_inputs(pixel_embed, patch_embed)
        pixel_embed = self.forward_inner(pixel_embed)
        patch_embed = self.add_words(pixel_embed, patch_embed)
        return pixel_embed, self.forward_outer(patch_embed)

    def forward_inner(self, pixel_embed: torch.Tensor) -> torch.Tensor:
        """The word-level sub-block (one fused kernel where available): (B·N, m, c) → (B·N, m, c)."""
        fused = fused_inner_sublayer(pixel_embed, self.norm_in, self.attn_in, self.norm_mlp_in, self.mlp_in,
                                     self.drop_path)
        if fused is not None:
            return fused
        pixel_embed = pixel_embed + self.drop_path(self.attn_in(self.norm_in(pixel_embed)))
        return pixel_embed + self.drop_path(self.mlp_in(self.norm_mlp_in(pixel_embed)))

    def add_words(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor) -> torch.Tensor:
        """Words → sentences: each sentence token (not the class token) gets its words' projection."""
        B, N, _ = patch_embed.shape
        if self.norm2_proj is None:
            words = self.proj(self.norm1_proj(pixel_embed).reshape(B, N - 1, pixel_embed.shape[1] * pixel_embed.shape[2]))  # (B, N-1, d)
        else:
            words = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, N - 1, pixel_embed.shape[1] * pixel_embed.shape[2]))))  # (B, N-1, d)
        return torch.cat([patch_embed[:, :1], patch_embed[:, 1:] + words], dim=1)  # (B, N, d)

    def forward_outer(self, patch_embed: torch.Tensor) -> torch.Tensor:
        """The sentence-level sub-block: (B, N + 1, d) → (B, N + 1, d)."""
        patch_embed = patch_embed + self.drop_path(self.attn_out(self.norm_out(patch_embed)))
        return patch_embed + self.drop_path(self.mlp(self.norm_mlp(patch_embed)))

"""Drop-in TNT block (timm `timm.models.tnt.Block`): inner (word) and outer (sentence) transformers."""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import Attention
from .layers import DropPath, Mlp


class TNTBlock(nn.Module):
    """One TNT block with timm's constructor and parameter names.

    Args:
        dim: inner (word) width c.  dim_out: outer (sentence) width d.  num_pixel: words per
            sentence m.  num_heads_in / num_heads_out: heads of the inner / outer attention.
        mlp_ratio: outer MLP hidden = d · mlp_ratio (the inner MLP is always 4c, as in timm).
        qkv_bias, proj_drop, attn_drop, drop_path, act_layer, norm_layer: as timm.
        legacy: timm's legacy word→sentence projection (LN(c) → Linear(m·c, d, bias)).
        backend: forwarded to both attentions.
    Shapes:
        forward(pixel_embed (B·N, m, c), patch_embed (B, N + 1, d)) →
            (pixel_embed (B·N, m, c), patch_embed (B, N + 1, d)); the class token (index 0) gets no
            word contribution.
    Source: Han et al. 2021 (TNT), Eq. 4-7; timm `tnt.py` (names, layouts).
    """

    def __init__(self, dim: int, dim_out: int, num_pixel: int, num_heads_in: int = 4, num_heads_out: int = 12,
                 mlp_ratio: float = 4., qkv_bias: bool = False, proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, legacy: bool = False, device=None, dtype=None,
                 backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
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

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor):
        # inner: words of every sentence
        pixel_embed = pixel_embed + self.drop_path(self.attn_in(self.norm_in(pixel_embed)))
        pixel_embed = pixel_embed + self.drop_path(self.mlp_in(self.norm_mlp_in(pixel_embed)))
        # words → sentences
        B, N, _ = patch_embed.shape
        if self.norm2_proj is None:
            words = self.proj(self.norm1_proj(pixel_embed).reshape(B, N - 1, -1))  # (B, N-1, d)
        else:
            words = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, N - 1, -1))))  # (B, N-1, d)
        patch_embed = torch.cat([patch_embed[:, :1], patch_embed[:, 1:] + words], dim=1)  # (B, N, d)
        # outer: sentences
        patch_embed = patch_embed + self.drop_path(self.attn_out(self.norm_out(patch_embed)))
        patch_embed = patch_embed + self.drop_path(self.mlp(self.norm_mlp(patch_embed)))
        return pixel_embed, patch_embed

"""Nested-TNT block: a TNT block whose inner and/or outer attention passes logits to the next block."""
from __future__ import annotations

import torch

from .block import TNTBlock
from .nested_attention import NestedAttention


class NestedTNTBlock(TNTBlock):
    """`TNTBlock` with nested-logit attention at the word level, the sentence level, or both.

    Args: as `TNTBlock`, plus
        nest_inner / nest_outer: use `NestedAttention` for the word / sentence attention (keys
            `attn_in.*` / `attn_out.*` unchanged, plus `attn_*.head_mlp.fc{1,2,3}` in the CODA form).
        head_mlp: CODA form (True) or RealFormer form (False).  noise: CODA's training noise.
    Shapes:
        forward(pixel_embed (B·N, m, c), patch_embed (B, N + 1, d), inner_logits None or
        (B·N, h_in, m, m), outer_logits None or (B, h_out, N + 1, N + 1)) → the same four, updated;
        a level that is not nested returns its logits argument (None) unchanged.
    Source: Liu, Qiu, Qin 2024 (Nested-TNT, arXiv 2404.13434); CODA (Zheng et al. 2021), Eq. 6-8.
    """

    def __init__(self, dim: int, dim_out: int, num_pixel: int, num_heads_in: int = 4, num_heads_out: int = 12,
                 nest_inner: bool = True, nest_outer: bool = True, head_mlp: bool = True, noise: bool = True,
                 qkv_bias: bool = False, proj_drop: float = 0., attn_drop: float = 0., device=None, dtype=None,
                 backend: str | None = None, **kwargs):
        super().__init__(dim, dim_out, num_pixel, num_heads_in=num_heads_in, num_heads_out=num_heads_out,
                         qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, device=device, dtype=dtype,
                         backend=backend, **kwargs)
        dd = {"device": device, "dtype": dtype}
        common = dict(qkv_bias=qkv_bias, head_mlp=head_mlp, noise=noise, attn_drop=attn_drop, proj_drop=proj_drop,
                      backend=backend, **dd)
        self.nest_inner, self.nest_outer = nest_inner, nest_outer
        if nest_inner:
            self.attn_in = NestedAttention(dim, dim, num_heads=num_heads_in, **common)
        if nest_outer:
            self.attn_out = NestedAttention(dim_out, dim_out, num_heads=num_heads_out, **common)

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor,
                inner_logits: torch.Tensor | None = None, outer_logits: torch.Tensor | None = None):
        pixel_embed, patch_embed = self.check_inputs(pixel_embed, patch_embed)
        if self.nest_inner:
            a, inner_logits = self.attn_in(self.norm_in(pixel_embed), inner_logits)
            pixel_embed = pixel_embed + self.drop_path(a)
            pixel_embed = pixel_embed + self.drop_path(self.mlp_in(self.norm_mlp_in(pixel_embed)))
        else:
            pixel_embed = self.forward_inner(pixel_embed)
        patch_embed = self.add_words(pixel_embed, patch_embed)
        if self.nest_outer:
            a, outer_logits = self.attn_out(self.norm_out(patch_embed), outer_logits)
            patch_embed = patch_embed + self.drop_path(a)
            patch_embed = patch_embed + self.drop_path(self.mlp(self.norm_mlp(patch_embed)))
        else:
            patch_embed = self.forward_outer(patch_embed)
        return pixel_embed, patch_embed, inner_logits, outer_logits

"""Nested-TNT: TNT whose word-level and/or sentence-level attention carries logits across blocks."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.nested_attention import HeadMlp
from ..nn.nested_block import NestedTNTBlock
from .tnt import TNT


class NestedTNT(TNT):
    """TNT with nested-logit multi-head attention (Liu, Qiu, Qin 2024, arXiv 2404.13434).

    Each nested level keeps one logit chain through the blocks: block l adds block l−1's logits
    (CODA form: then a head-mixing MLP; RealFormer form: nothing more) before its softmax. The
    first block starts the chains (Z_1 = A_1), so it has no head-MLP: 24H² + 9H extra parameters
    per nested attention in blocks 2..depth.

    Args: as `TNT`, plus
        nest_inner: nest the word-level attention (logits (B·N, h_in, m, m)).
        nest_outer: nest the sentence-level attention (logits (B, h_out, N + 1, N + 1)).
            The paper does not say which level it nests; both default to True.
        head_mlp: CODA form (True, the paper's) or RealFormer form (False).
        logit_noise: CODA's N(0, 1) logit noise in training.
    Shapes: as `TNT`.
    Raises: as `TNT`; ValueError if neither level is nested.
    Source: Nested-TNT (arXiv 2404.13434); CODA (Zheng et al. 2021), Eq. 6-8; docs/tnt-family.md §3.
    """

    def __init__(self, *args, nest_inner: bool = True, nest_outer: bool = True, head_mlp: bool = True,
                 logit_noise: bool = True, **kwargs):
        if not (nest_inner or nest_outer):
            raise ValueError("NestedTNT: nest_inner or nest_outer must be True (else use TNT)")
        self._nesting = dict(nest_inner=nest_inner, nest_outer=nest_outer, head_mlp=head_mlp, noise=logit_noise)
        super().__init__(*args, **kwargs)
        first = self.blocks[0]  # layer 1 has Z_1 = A_1: a head-MLP there would never be used
        for attn in (first.attn_in, first.attn_out):
            if getattr(attn, "head_mlp", None) is not None:
                attn.head_mlp = None
        for m in self.modules():  # TNT's init touched every Linear; the head-MLPs keep CODA's init
            if isinstance(m, HeadMlp):
                m.reset_parameters()

    def _make_block(self, *args, **kwargs) -> nn.Module:
        return NestedTNTBlock(*args, **self._nesting, **kwargs)

    def _initial_state(self, x: torch.Tensor) -> tuple:
        # (words, sentences, inner logits, outer logits): the first block starts both logit chains
        return (*self.embed(x), None, None)

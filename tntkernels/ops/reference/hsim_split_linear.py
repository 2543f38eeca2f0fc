"""Reference H_sim-split linear op of TinT: a cross-head mix followed by a per-head block map.

docs/tint.md §1 (Panigrahi et al., "Trainable Transformer in Transformer", arXiv 2307.01189). A row
x ∈ R^D is viewed as x[h, k], head h < H, coordinate k < d, D = H·d:

    mix:    z[n, g, k] = Σ_h x[n, h, k] · M[k, h, g] + m[k, g]       M (d, H, H), m (d, H)
    block:  y[n, g, :] = z[n, g, :] @ A[g] + a[g]                     A (H, d, d), a (H, d)

It equals a dense map with W_dense[(h, k), (g, j)] = M[k, h, g] · A[g][k, j].
"""
from __future__ import annotations

import torch


def hsim_split_linear_ref(x, mix_weight=None, mix_bias=None, block_weight=None, block_bias=None):
    """Reference H_sim-split linear map in plain PyTorch.

    Args:
        x: (..., D), D = H·d.
        mix_weight: (d, H, H) or None (mix part skipped); mix_bias: (d, H) or None.
        block_weight: (H, d, d) or None (block part skipped); block_bias: (H, d) or None.
    Returns:
        (..., D), x's dtype.
    Source: Panigrahi et al. 2023 (TinT), §3 "H_sim-split linear operations".
    """
    H, d = heads(mix_weight, block_weight, x.shape[-1])
    y = x.reshape(-1, H, d)  # (N, H, d)
    if mix_weight is not None:
        y = torch.einsum("nhk,khg->ngk", y, mix_weight)  # (N, H, d)
        if mix_bias is not None:
            y = y + mix_bias.t()  # (H, d)
    if block_weight is not None:
        y = torch.einsum("ngk,gkj->ngj", y, block_weight)  # (N, H, d)
        if block_bias is not None:
            y = y + block_bias
    return y.reshape(x.shape)


def heads(mix_weight, block_weight, D):
    if mix_weight is not None:
        return mix_weight.shape[1], mix_weight.shape[0]
    if block_weight is not None:
        return block_weight.shape[0], block_weight.shape[1]
    return 1, D

"""Reference nested-logit multi-head attention (Nested-TNT / CODA / RealFormer).

Each layer's pre-softmax logits are handed to the next layer and added there (docs/tnt-family.md
§3). Per layer l, heads H, tokens T, A_l = (Q_l · scale) K_lᵀ:

    layer 1:    Z_1 = A_1
    layer l>1:  S_l = A_l + Z_{l-1};   Z_l = S_l + MLP_heads(S_l)   (CODA; RealFormer: Z_l = S_l)
    training:   Z_l = Z_l + ε
    out_l = softmax_keys(Z_l) V_l

MLP_heads acts on the head axis at every (b, i, j): Linear(H, 4H) → LeakyReLU(0.2) →
Linear(4H, 4H) → LeakyReLU(0.2) → Linear(4H, H). Positions where S_l is −inf stay −inf and enter
the MLP as 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LEAKY_SLOPE = 0.2


def head_mlp_ref(s: torch.Tensor, head_mlp) -> torch.Tensor:
    """CODA's head-MLP on the head axis of s (B, H, T, T); −inf entries enter as 0.

    head_mlp: (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)), nn.Linear convention.
    Returns (B, H, T, T): MLP_heads(s), without the residual.
    """
    w1, b1, w2, b2, w3, b3 = head_mlp
    x = s.masked_fill(torch.isneginf(s), 0.0).permute(0, 2, 3, 1)  # (B, T, T, H)
    x = F.leaky_relu(F.linear(x, w1, b1), LEAKY_SLOPE)  # (B, T, T, 4H)
    x = F.leaky_relu(F.linear(x, w2, b2), LEAKY_SLOPE)  # (B, T, T, 4H)
    x = F.linear(x, w3, b3)  # (B, T, T, H)
    return x.permute(0, 3, 1, 2)  # (B, H, T, T)


def nested_attention_ref(q, k, v, prev_logits=None, head_mlp=None, noise=None, scale=None):
    """Reference nested-logit attention in plain PyTorch.

    Args:
        q, k: (B, H, T, d); v: (B, H, T, dv). Any floating dtype, one device.
        prev_logits: None (first layer: Z = A) or Z_{l-1}, (B, H, T, T).
        head_mlp: None (RealFormer: Z = A + Z_{l-1}) or the six CODA head-MLP tensors
            (w1 (4H, H), b1 (4H), w2 (4H, 4H), b2 (4H), w3 (H, 4H), b3 (H)); used only when
            prev_logits is given (layer 1 has Z_1 = A_1).
        noise: None or (B, H, T, T), added to Z (training-time ε ~ N(0, 1)).
        scale: float, default d ** -0.5.
    Returns:
        (out (B, H, T, dv), logits Z (B, H, T, T)), dtype of q; Z is what the next layer receives.
    Source: Zheng, Wu, Kong 2021 (CODA), Eq. 6-8; Liu, Qiu, Qin 2024 (Nested-TNT); He et al. 2021
        (RealFormer).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    z = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if prev_logits is not None:
        z = z + prev_logits
        if head_mlp is not None:
            z = z + head_mlp_ref(z, head_mlp)
    if noise is not None:
        z = z + noise
    out = z.softmax(dim=-1) @ v  # (B, H, T, dv)
    return out, z


def nested_attention_op_ref(q, k, v, prev_logits, head_mlp, noise, scale):
    """`nested_attention_ref` with the kernel ops' signature: head_mlp a list ([] for none), no
    gradient into noise. Returns (out, logits)."""
    return nested_attention_ref(q, k, v, prev_logits, tuple(head_mlp) if len(head_mlp) else None,
                                None if noise is None else noise.detach(), scale)

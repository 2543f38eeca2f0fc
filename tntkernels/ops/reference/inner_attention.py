"""Reference batched inner attention: softmax(q kᵀ · scale) v over many short sequences.

TNT (Han et al. 2021, arXiv 2103.00112, Eq. 2-3) runs multi-head self-attention among the m
"visual words" of every "visual sentence": for TNT-S, (B·196 sentences, 4 heads, 16 words,
head_dim 6). Formulas and shapes: docs/tnt-family.md §1.
"""
from __future__ import annotations

import torch


def inner_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference softmax(q kᵀ · scale) v in plain PyTorch (materializes the logits).

    Args:
        q, k: (S, H, m, d); v: (S, H, m, dv) — S sequences, H heads, m tokens, head_dim d (dv for v).
            Any floating dtype (float64 for oracles), one device, any strides.
        scale: float, default d ** -0.5.
    Returns:
        (S, H, m, dv), dtype of q. The softmax runs in q's dtype, as timm's TNT Attention does.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale  # (S, H, m, m)
    return logits.softmax(dim=-1) @ v  # (S, H, m, dv)

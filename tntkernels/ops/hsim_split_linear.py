"""TinT's H_sim-split linear op, a cross-head mix followed by a per-head block map: the public op.

Formulas in `reference/hsim_split_linear.py` and docs/tint.md §1 (Panigrahi et al., "Trainable
Transformer in Transformer", arXiv 2307.01189, §3). Kernels: `cpp/hsim_split_linear.py` (C++ CPU,
CUDA C++) and `triton/hsim_split_linear.py`; backend choice: `registry.py`.
"""
from __future__ import annotations

from . import registry
from ._checks import check_same, check_shape, check_tensor
from .reference.hsim_split_linear import heads, hsim_split_linear_ref

__all__ = ["hsim_split_linear", "hsim_split_linear_ref"]


def hsim_split_linear(x, mix_weight=None, mix_bias=None, block_weight=None, block_bias=None, *, backend=None):
    """H_sim-split linear op y = Block(Mix(x)) of TinT; either part may be None.

    Args:
        x: (..., D), D = H·d; float16, bfloat16, float32 or float64.
        mix_weight: (d, H, H) M[k, h, g]; mix_bias: (d, H) m[k, g]; both None skips the mix.
        block_weight: (H, d, d) A[g][k, j]; block_bias: (H, d) a[g, j]; both None skips the block.
        backend: None (the C++ op on CPU, the reference on CUDA for now), "reference", "cpu" (C++),
            "cuda" (CUDA C++: d <= 256, H <= 64) or "triton" (d <= 256, H <= 64; float32 / float16 /
            bfloat16).
    Returns:
        (..., D), x's dtype; differentiable in x and every weight and bias.
    Raises:
        TypeError / ValueError: an input is not a tensor; shapes, dtypes or devices disagree; a bias
            given without its weight; D = 0; outside the "cuda" or "triton" backend's range above.
            Every check: docs/bad-input.md.
        RuntimeError: the requested backend is not implemented or not available.
    Source: Panigrahi et al. 2023 (TinT), §3.
    """
    op = "hsim_split_linear"
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., D), got a 0-d tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{op}: x's last dim D must be >= 1 (D = H·d), got shape {tuple(x.shape)}")
    check_same(op, "x", x, mix_weight=mix_weight, mix_bias=mix_bias, block_weight=block_weight,
               block_bias=block_bias)
    D = x.shape[-1]
    for wname, w, bname, b in (("mix_weight", mix_weight, "mix_bias", mix_bias),
                               ("block_weight", block_weight, "block_bias", block_bias)):
        if w is None and b is not None:
            raise ValueError(f"{op}: {bname} given without {wname}")
        if w is not None:
            check_tensor(op, wname, w, 3, "(d, H, H)" if wname == "mix_weight" else "(H, d, d)")
        if b is not None:
            check_tensor(op, bname, b, 2, "(d, H)" if bname == "mix_bias" else "(H, d)")
    H, d = heads(mix_weight, block_weight, D)
    if H * d != D:
        raise ValueError(f"{op}: x's last dim D={D} must equal H·d = {H}·{d} from the weights")
    if mix_weight is not None:
        check_shape(op, "mix_weight", mix_weight, (d, H, H), "(d, H, H)")
        if mix_bias is not None:
            check_shape(op, "mix_bias", mix_bias, (d, H), "(d, H)")
    if block_weight is not None:
        check_shape(op, "block_weight", block_weight, (H, d, d), "(H, d, d)")
        if block_bias is not None:
            check_shape(op, "block_bias", block_bias, (H, d), "(H, d)")
    # the backends' fit checks see (x, H, d); with both parts None, the op sees H = 1 and d = D
    return registry.call(op, backend, x.device, (x, H, d), x, mix_weight, mix_bias, block_weight, block_bias)

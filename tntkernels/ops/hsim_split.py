"""TinT's H_sim-split linear op: a cross-head mix followed by a per-head block-diagonal map.

Spec: shared/specs/tint.md §1 (Panigrahi et al., "Trainable Transformer in Transformer", arXiv
2307.01189). A row x ∈ R^D is viewed as x[h, k], head h < H, coordinate k < d, D = H·d:

    mix:    z[n, g, k] = Σ_h x[n, h, k] · M[k, h, g] + m[k, g]       M (d, H, H), m (d, H)
    block:  y[n, g, :] = z[n, g, :] @ A[g] + a[g]                     A (H, d, d), a (H, d)

It equals a dense map with W_dense[(h, k), (g, j)] = M[k, h, g] · A[g][k, j].
"""
from __future__ import annotations

import torch

from .. import _backend
from ._checks import check_same, check_shape, check_tensor


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
    H, d = _heads(mix_weight, block_weight, x.shape[-1])
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


def _heads(mix_weight, block_weight, D):
    if mix_weight is not None:
        return mix_weight.shape[1], mix_weight.shape[0]
    if block_weight is not None:
        return block_weight.shape[0], block_weight.shape[1]
    return 1, D


def _triton(x, mix_weight, mix_bias, block_weight, block_bias):
    return hsim_split_triton.hsim_split_linear_triton(x, mix_weight, mix_bias, block_weight, block_bias)


def _compiled(x, mix_weight, mix_bias, block_weight, block_bias):
    return hsim_split_cpp.hsim_split_linear_compiled(x, mix_weight, mix_bias, block_weight, block_bias)


_IMPLEMENTED = {"reference": hsim_split_linear_ref, "cpu": _compiled, "cuda": _compiled, "triton": _triton}
# On CPU, None means the C++ op (measured, N 2304, D 768, H 12, fp32, 2 threads: forward 4.6 ms vs the
# reference's einsum ≈ 1.3 s); on CUDA the reference until the CUDA C++ and Triton kernels are
# measured on a GPU (scripts/gpu_suite.sh): name them to use them meanwhile.
_PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ()}


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
    H, d = _heads(mix_weight, block_weight, D)
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
    name = _backend.resolve(op, backend, x.device, _IMPLEMENTED, _PREFERENCE)
    if name == "cuda":
        _check_cuda(op, x, H, d)  # as the CUDA op, even with both parts None (then H = 1, d = D)
    return _IMPLEMENTED[name](x, mix_weight, mix_bias, block_weight, block_bias)


def _check_cuda(op: str, x: torch.Tensor, H: int, d: int) -> None:
    """The CUDA C++ kernels' limits, checked here so they raise ValueError like the Triton ones."""
    if x.dtype == torch.float64:
        raise ValueError(f"{op}: the 'cuda' backend supports float32, float16 and bfloat16, got {x.dtype}")
    if not (H <= hsim_split_cpp.CUDA_MAX_HEADS and d <= hsim_split_cpp.CUDA_MAX_HEAD_DIM):
        raise ValueError(f"{op}: the 'cuda' backend supports H <= {hsim_split_cpp.CUDA_MAX_HEADS} heads and head "
                         f"width d <= {hsim_split_cpp.CUDA_MAX_HEAD_DIM}, got H={H}, d={d}")


# The kernels' modules import this one: import them last, to register their ops.
from . import hsim_split_cpp, hsim_split_triton  # noqa: E402

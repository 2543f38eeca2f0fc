"""TNT's inner (word-level) sub-block, LN → MHA → residual → LN → MLP(GELU) → residual: the public op.

Formula in `reference/inner_block.py` (Han et al. 2021, TNT, Eq. 6-7; docs/tnt-family.md §1); the
fused Triton kernels in `triton/inner_block.py`; backend choice: `registry.py`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from . import registry
from ._checks import check_tensor
from .reference.inner_block import LN_PARAMS, OPTIONAL_PARAMS, PARAM_NAMES, eps_pair, inner_block_ref, param_shapes

__all__ = ["inner_block", "inner_block_ref", "fused_available", "PARAM_NAMES", "OPTIONAL_PARAMS"]


def fused_available(x: torch.Tensor, C: int, hidden: int, num_heads: int, backend: str | None,
                    compute_dtype: torch.dtype | None = None) -> bool:
    """True when `inner_block(..., compute_dtype=compute_dtype, backend=backend)` would run the fused
    Triton kernel for x; a backend this op does not implement (or that cannot run here, or does not
    cover the shape on this device) answers False instead of raising."""
    try:
        return registry.resolve("inner_block", backend, x.device, x, C, hidden, compute_dtype) == "triton"
    except (RuntimeError, ValueError):
        return False


def inner_block(x: torch.Tensor, params: Mapping[str, torch.Tensor | None], *, num_heads: int,
                eps: float | tuple[float, float] = 1e-5,
                drop_path_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                compute_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """TNT's inner (word-level) sub-block, LN → MHA → residual → LN → MLP(GELU) → residual, fused.

    Args:
        x: (S, m, C) word tokens of S sentences (TNT: S = batch · sentences), any strides;
            float16, bfloat16 or float32 (float64 with the reference backend).
        params: timm names relative to a TNT Block (`PARAM_NAMES`: "norm_in.weight", ...,
            "mlp_in.fc2.bias") → tensors of shapes LN (C,), qk (2C, C) / (2C,), v and proj (C, C) /
            (C,), fc1 (hidden, C) / (hidden,), fc2 (C, hidden) / (C,); the qk and v biases may be
            missing or None. Any floating dtype: they are cast to the compute dtype (differentiably).
        num_heads: H, dividing C; head_dim = C / H, attention scale head_dim ** -0.5 (timm).
        eps: LayerNorm eps, one float or (eps of norm_in, eps of norm_mlp_in).
        drop_path_scales: None, or (s_attn, s_mlp), each (S,) on x's device: per-sentence factor
            on each residual branch (DropPath's mask / keep_prob); no gradient flows to them.
        compute_dtype: dtype of the parameters and GEMM inputs (default x's dtype; float16 or
            bfloat16 with a float32 x is what autocast does: the residual stream stays float32).
        backend: None (the fused kernel where it is the default for the device, else the
            reference; TNTKERNELS_BACKEND overrides), "reference" or "triton".
    Returns:
        (S, m, C), contiguous, x's dtype. Differentiable with respect to x and every parameter.
    Raises:
        TypeError: x or a parameter is not a tensor; params not a mapping; eps, compute_dtype or
            drop_path_scales of the wrong type.
        ValueError: x not 3-D or C = 0; a parameter missing or of the wrong shape; C not divisible by
            num_heads; tensors on different devices; eps not positive; compute_dtype neither x's
            dtype nor float16/bfloat16 with a float32 x; with backend "triton": a dtype, m, C or
            hidden width outside its range (m, C <= 64, hidden <= 4·next_pow2(C)).
            Every check: docs/bad-input.md.
        RuntimeError: the backend is unknown for this op or unavailable on x's device.
    Source: Han et al. 2021 (TNT), Eq. 6-7; timm `timm.models.tnt.Block.forward` (inner half).
    """
    op = "inner_block"
    check_tensor(op, "x", x, 3, "(S, m, C)")
    S, m, C = x.shape
    if C < 1:
        raise ValueError(f"{op}: x must have width C >= 1 in (S, m, C), got shape {tuple(x.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"{op}: num_heads must be a positive int dividing C = {C}, got {num_heads!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"{op}: params must be a mapping of timm names to tensors (e.g. a dict or "
                        f"module.state_dict()), got {type(params).__name__}")
    w1 = params.get("mlp_in.fc1.weight")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise ValueError(f"{op}: params['mlp_in.fc1.weight'] must be a (hidden, C) tensor")
    hidden = w1.shape[0]
    shapes = param_shapes(C, hidden)
    compute = compute_dtype or x.dtype
    if not isinstance(compute, torch.dtype):
        raise TypeError(f"{op}: compute_dtype must be None or a torch.dtype, got {type(compute).__name__} {compute!r}")
    if compute != x.dtype and not (x.dtype == torch.float32 and compute in (torch.float16, torch.bfloat16)):
        # as autocast: only a float32 stream may compute in float16 / bfloat16 (anything else autocast
        # ignores with a warning, running silently in x's dtype)
        raise ValueError(f"{op}: compute_dtype must be x's dtype, or float16/bfloat16 with a float32 x; "
                         f"got x {x.dtype}, compute_dtype {compute}")
    flat = []
    for name in PARAM_NAMES:
        t = params.get(name)
        if t is None and name in OPTIONAL_PARAMS:
            flat.append(None)
            continue
        if t is None:
            raise ValueError(f"{op}: params must hold {name!r} (timm TNT Block names: {PARAM_NAMES})")
        check_tensor(op, f"params[{name!r}]", t)
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{op}: params[{name!r}] must have shape {shapes[name]} for C = {C}, hidden = "
                             f"{hidden}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: params[{name!r}] is on {t.device} but x is on {x.device}")
        flat.append(t)
    if drop_path_scales is not None:
        if not hasattr(drop_path_scales, "__len__"):
            raise TypeError(f"{op}: drop_path_scales must be None or a pair (s_attn, s_mlp), got "
                            f"{type(drop_path_scales).__name__}")
        if len(drop_path_scales) != 2:
            raise ValueError(f"{op}: drop_path_scales must be None or (s_attn, s_mlp)")
        for t, what in zip(drop_path_scales, ("s_attn", "s_mlp")):
            check_tensor(op, f"drop_path_scales {what}", t, 1, f"(S,) = ({S},)")
            if t.shape[0] != S or t.device != x.device:
                raise ValueError(f"{op}: drop_path_scales {what} must be ({S},) on {x.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
    eps_in, eps_mlp = eps_pair(eps)
    name = registry.resolve(op, backend, x.device, x, C, hidden, compute)
    if name == "reference":
        named = dict(zip(PARAM_NAMES, flat))
        if compute == x.dtype:
            named = {n: (t.to(compute) if t is not None else None) for n, t in named.items()}
            return inner_block_ref(x, named, num_heads=num_heads, eps=(eps_in, eps_mlp),
                                   drop_path_scales=drop_path_scales)
        with torch.autocast(x.device.type, dtype=compute):  # what compute_dtype stands for
            return inner_block_ref(x, named, num_heads=num_heads, eps=(eps_in, eps_mlp),
                                   drop_path_scales=drop_path_scales)
    zeros = {"attn_in.qk.bias": 2 * C, "attn_in.v.bias": C}
    # LayerNorm parameters stay float32 (LayerNorm runs in float32, as under CUDA autocast); the
    # Linear weights and biases take the compute dtype, as autocast casts them.
    tensors = [(t if t is not None else x.new_zeros(zeros[n])).to(
        torch.float32 if n in LN_PARAMS else compute).contiguous() for n, t in zip(PARAM_NAMES, flat)]
    if drop_path_scales is None:
        s_attn = s_mlp = x.new_ones(S, dtype=torch.float32)
    else:
        s_attn, s_mlp = (t.detach().to(torch.float32).contiguous() for t in drop_path_scales)
    return registry.OPS[op].implementations["triton"](x, tensors, s_attn, s_mlp, num_heads, eps_in, eps_mlp)

"""tntkernels: fused kernels for the transformer-in-transformer family (TNT, RTNT, Nested-TNT, TinT).

Public API:
    inner_attention, nested_attention, hsim_split_linear     — functional ops with `backend=`
    inner_block        — TNT's fused inner sub-block (LN → MHA → LN → MLP, residuals)
    inner_attention_ref, nested_attention_ref, hsim_split_linear_ref — pure-PyTorch references
    tntkernels.nn      — drop-in modules (Attention, TNTBlock)
    swap_in            — patch a timm TNT model in place onto those modules (`swap_in(model)`)
    create_model, list_models — TNT, RTNT, Nested-TNT by name, as `timm.create_model` (tntkernels.models)
"""
__version__ = "0.1.0"

from . import _backend  # noqa: E402  (loads tntkernels._C, registering torch.ops.tntkernels.*)
from .ops import (  # noqa: E402
    hsim_split_linear,
    hsim_split_linear_ref,
    inner_attention,
    inner_attention_ref,
    inner_block,
    inner_block_ref,
    nested_attention,
    nested_attention_ref,
)
from .models import create_model, list_models  # noqa: E402
from .swap import swap_in  # noqa: E402

__all__ = [
    "__version__",
    "inner_attention", "inner_attention_ref",
    "inner_block", "inner_block_ref",
    "nested_attention", "nested_attention_ref",
    "hsim_split_linear", "hsim_split_linear_ref",
    "swap_in", "create_model", "list_models",
]

"""Op families: each file holds the reference (`<op>_ref`), the kernels' registration and dispatch."""
from .hsim_split import hsim_split_linear, hsim_split_linear_ref
from .inner_attention import inner_attention, inner_attention_ref
from .inner_block import inner_block, inner_block_ref
from .nested_attention import head_mlp_ref, nested_attention, nested_attention_ref

__all__ = [
    "inner_attention", "inner_attention_ref",
    "inner_block", "inner_block_ref",
    "nested_attention", "nested_attention_ref", "head_mlp_ref",
    "hsim_split_linear", "hsim_split_linear_ref",
]

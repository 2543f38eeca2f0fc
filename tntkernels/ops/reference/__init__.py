"""Pure-PyTorch references, one module per op family (`<op>_ref`): the semantics every kernel is
tested against. They import no kernel and run on any device and floating dtype (float64 for oracles)."""
from .hsim_split_linear import hsim_split_linear_ref
from .inner_attention import inner_attention_ref
from .inner_block import inner_block_ref
from .nested_attention import head_mlp_ref, nested_attention_ref

__all__ = ["inner_attention_ref", "inner_block_ref", "nested_attention_ref", "head_mlp_ref", "hsim_split_linear_ref"]

"""Op families, one layout for each (`<family>` in inner_attention, inner_block, nested_attention,
hsim_split_linear):

    <family>.py            the public function: input checks, then the registry's choice of backend
    reference/<family>.py  `<family>_ref`, the pure-PyTorch semantics (imports no kernel)
    cpp/<family>.py        the compiled C++ CPU / CUDA C++ op: fake kernel, autograd, its CUDA limits
    triton/<family>.py     Triton kernels, launchers and the custom op (fake kernel, autograd)
    triton/_common.py      what the Triton kernels share (dtypes, block sizes, jit helpers)
    _autograd.py           first order through the kernel, double backward through the reference
    registry.py            implementations, default order per device, limits per backend
"""
from .hsim_split_linear import hsim_split_linear, hsim_split_linear_ref
from .inner_attention import inner_attention, inner_attention_ref
from .inner_block import inner_block, inner_block_ref
from .nested_attention import head_mlp_ref, nested_attention, nested_attention_ref

__all__ = [
    "inner_attention", "inner_attention_ref",
    "inner_block", "inner_block_ref",
    "nested_attention", "nested_attention_ref", "head_mlp_ref",
    "hsim_split_linear", "hsim_split_linear_ref",
]

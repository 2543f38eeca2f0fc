"""Triton kernels, one module per op family: kernels, launchers, and the custom ops
`tntkernels::<family>_triton[_backward]` with their fake kernels and autograd. Shared helpers:
`_common`. The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""

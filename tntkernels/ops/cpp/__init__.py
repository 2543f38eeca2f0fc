"""The compiled ops of `tntkernels._C` (C++ CPU and CUDA C++ kernels behind one schema per op): for
each family, its fake kernel (for torch.compile), its autograd, and the call the registry makes.
Schemas: csrc/tntkernels.cpp. Importing these modules without a built extension registers nothing."""
from __future__ import annotations

import torch

from ... import _backend


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row log-sum-exp the attention kernels save: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_limit(op: str, what: str) -> int:
    """A CUDA kernel limit, as exported by `tntkernels._C.limits()` ("<op>.cuda.<what>")."""
    key = f"{op}.cuda.{what}"
    limits = _backend.cpp_limits()
    if key not in limits:
        raise RuntimeError(f"{op}: tntkernels._C does not export the limit {key!r}; rebuild the extension "
                           "(pip install --no-build-isolation -e .)")
    return limits[key]


def unsupported_dtype_cuda(t: torch.Tensor) -> str | None:
    """The CUDA C++ kernels take float32, float16 and bfloat16 (no float64)."""
    if t.dtype == torch.float64:
        return f"dtype {t.dtype} (supported: float32, float16 and bfloat16)"
    return None

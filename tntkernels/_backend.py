"""Which backends this machine can run: the compiled extension, CUDA, Triton and its interpreter.

Backends:
    "reference": the pure-PyTorch `<op>_ref` (any device, any floating dtype, autograd by PyTorch);
    "cpu":       the C++ op `torch.ops.tntkernels.<op>` on CPU tensors (from `tntkernels._C`);
    "cuda":      the CUDA C++ op `torch.ops.tntkernels.<op>` on CUDA tensors (same extension);
    "triton":    Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

How `backend=None` picks among them, and what each covers: `tntkernels.ops.registry`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

try:  # registers torch.ops.tntkernels.* (schemas, CPU and, when compiled, CUDA kernels)
    from . import _C  # type: ignore[attr-defined]

    _C_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"


def cpp_available() -> bool:
    """True when the compiled extension `tntkernels._C` imported (C++ CPU ops registered)."""
    return _C is not None


def cpp_limits() -> dict[str, int]:
    """The CUDA C++ kernels' limits exported by `tntkernels._C.limits()` ({"<op>.cuda.<what>": n}),
    empty when the extension is not built."""
    if _C is None or not hasattr(_C, "limits"):
        return {}
    return dict(_C.limits())


def cuda_compiled() -> bool:
    """True when `tntkernels._C` holds CUDA kernels (built with nvcc and a CUDA build of torch)."""
    return _C is not None and bool(_C.cuda_compiled())


def cuda_archs() -> str:
    """TORCH_CUDA_ARCH_LIST the extension was compiled for ('' when CPU-only)."""
    return _C.cuda_archs() if _C is not None else ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, at import: torch.compile (dynamo, torch 2.11) refuses to trace importlib's find_spec,
# and traces into functools.cache wrappers, so the answer must be a plain constant by forward time.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """True when the triton package is installed (looked up once, when tntkernels is imported)."""
    return _TRITON_IMPORTABLE


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if _C is None:
            return f"the compiled extension tntkernels._C did not import ({_C_ERROR})"
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        return None
    if backend == "cuda":
        if _C is None:
            return f"the compiled extension tntkernels._C did not import ({_C_ERROR})"
        if not cuda_compiled():
            return "tntkernels._C was built without CUDA (no nvcc, a CPU-only torch, or TNTKERNELS_FORCE_CPU=1)"
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        return None
    if backend == "triton":
        if not triton_importable():
            return "the triton package is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    return f"unknown backend {backend!r}; expected one of {BACKENDS} or None"

"""Which implementations exist on this machine, and how a `backend=` argument is resolved.

Backends:
    "reference": the pure-PyTorch `<op>_ref` (any device, any floating dtype, autograd by PyTorch);
    "cpu":       the C++ op `torch.ops.tntkernels.<op>` on CPU tensors (from `tntkernels._C`);
    "cuda":      the CUDA C++ op `torch.ops.tntkernels.<op>` on CUDA tensors (same extension);
    "triton":    Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

`backend=None` picks the best implementation available for the tensors' device; the
environment variable TNTKERNELS_BACKEND, when set, replaces `None`.
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


def cuda_compiled() -> bool:
    """True when `tntkernels._C` holds CUDA kernels (built with nvcc and a CUDA build of torch)."""
    return _C is not None and bool(_C.cuda_compiled())


def cuda_archs() -> str:
    """TORCH_CUDA_ARCH_LIST the extension was compiled for ('' when CPU-only)."""
    return _C.cuda_archs() if _C is not None else ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


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


def resolve(op: str, backend: str | None, device: torch.device, implemented: dict[str, object],
            preference: dict[str, tuple[str, ...]]) -> str:
    """Pick the backend that runs `op` on `device`.

    Args:
        op: the op's name, for messages.
        backend: the caller's choice; None means TNTKERNELS_BACKEND if set, else the first of
            `preference[device.type]` that is implemented and available.
        implemented: backend name -> implementation, for the backends this op has.
        preference: device type -> backends in order of preference.
    Raises:
        ValueError: `backend` is not a known backend name.
        RuntimeError: the requested backend is not implemented for `op` or cannot run on `device`.
    """
    if backend is None:
        backend = os.environ.get("TNTKERNELS_BACKEND") or None
    if backend is None:
        for name in preference.get(device.type, ()) + ("reference",):
            if name in implemented and why_unavailable(name, device) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected None or one of {BACKENDS}")
    if backend not in implemented:
        raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op; "
                           f"implemented: {tuple(implemented)}")
    why = why_unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {why}")
    return backend

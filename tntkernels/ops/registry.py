"""The registry of op families: for each op, its implementations per backend, the order `backend=None`
tries them in per device, and what each backend covers (limits and a fit check).

Backends:
    "reference": the pure-PyTorch `<op>_ref` (any device, any floating dtype, autograd by PyTorch);
    "cpu":       the C++ op `torch.ops.tntkernels.<op>` on CPU tensors (from `tntkernels._C`);
    "cuda":      the CUDA C++ op `torch.ops.tntkernels.<op>` on CUDA tensors (same extension);
    "triton":    Triton kernels on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).

Choosing a backend (`resolve`): an explicit name must be implemented for the op, available on the
tensors' device, and cover the input (else RuntimeError / ValueError naming why). `backend=None`
(or TNTKERNELS_BACKEND when set) tries the op's `default_order` for the device, skipping what is
unavailable or does not cover the input, and ends at the reference.

GPU defaults: no GPU kernel of this package is the default on CUDA tensors until the GPU suite
(scripts/gpu_suite.sh) has passed on hardware; `GPU_KERNELS_VERIFIED` is that one switch. Until it
is set, `backend=None` on CUDA tensors runs the reference, and the kernels run when named.

The C++ side's CUDA limits come from `tntkernels._C.limits()` (csrc/include/tntkernels/limits.h), so
Python and C++ cannot disagree; the Triton limits are the constants of each Triton module.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import _backend
from .cpp import hsim_split_linear as cpp_hsim
from .cpp import inner_attention as cpp_inner
from .cpp import nested_attention as cpp_nested
from .reference import hsim_split_linear_ref, inner_attention_ref, inner_block_ref, nested_attention_ref
from .triton import hsim_split_linear as triton_hsim
from .triton import inner_attention as triton_inner
from .triton import inner_block as triton_block
from .triton import nested_attention as triton_nested

BACKENDS = _backend.BACKENDS

# The one switch: set to True once `bash scripts/gpu_suite.sh verdict` has passed on a GPU; then
# backend=None on CUDA tensors follows each op's default_order["cuda"] (set from the benchmarks).
GPU_KERNELS_VERIFIED = False

Fit = Callable[..., "str | None"]  # fit(*args) -> None when the backend covers the input, else why not


@dataclass(frozen=True)
class OpSpec:
    """One op family as the dispatcher sees it.

    name: the public function's name.
    implementations: backend -> callable taking the checked inputs.
    default_order: device type -> backends `backend=None` tries first (then the reference).
    unsupported: backend -> fit check; its args are what the public function passes to `resolve`.
    auto_unsupported: backend -> an extra fit check applied only when chosen by `backend=None`
        (e.g. where a slower-than-PyTorch regime was measured).
    limits: backend -> callable returning {limit name: value}, for reports and docs.
    """
    name: str
    implementations: Mapping[str, Callable]
    default_order: Mapping[str, tuple[str, ...]]
    unsupported: Mapping[str, Fit] = field(default_factory=dict)
    auto_unsupported: Mapping[str, Fit] = field(default_factory=dict)
    limits: Mapping[str, Callable[[], dict[str, int]]] = field(default_factory=dict)


def _cuda_limits(op: str) -> Callable[[], dict[str, int]]:
    def limits() -> dict[str, int]:
        prefix = f"{op}.cuda."
        return {k[len(prefix):]: v for k, v in _backend.cpp_limits().items() if k.startswith(prefix)}
    return limits


# Measured on a 2-core x86 machine (d = 32, m = 17): above this head_dim PyTorch's batched GEMMs beat
# the C++ CPU op, so backend=None on CPU takes the C++ op only up to it (TNT's inner 6 / 10, RTNT's
# letters).
MAX_AUTO_CPU_HEAD_DIM = 16

# nested_attention on CPU: backend=None takes the C++ op where it was measured faster than the reference
# (fwd+bwd, float32, TNT-S shapes; 2-core x86 AVX-512 box; benchmarks/bench_cpu.py rows, and the same rows
# timed at 1 thread in process CPU time, which the box's load does not inflate):
#   T = 16 (the 16-lane tile path), d, dv <= 64: RealFormer 1.8x, CODA 5.3x (1 thread, CPU time);
#   the head-MLP (CODA) at T <= 256: 1.7x at B 8, H 6, T 197, d 64 (1 thread, CPU time);
#   RealFormer / first layer at T != 16: NOT faster — 0.83x at T 197, d 64 (1 thread, CPU time): the
#     backward recomputes q kᵀ (7 GEMMs against autograd's 6), so the reference stays the default there.
# (With 2 threads on the loaded box, wall-clock, all four rows came out 2.3-4.0x, as the reference pays a
# thread synchronisation per ATen op there.) float16 / bfloat16 / float64 were not measured: reference.
MAX_AUTO_CPU_NESTED_TOKENS = 256
MAX_AUTO_CPU_NESTED_HEAD_DIM = 64


def _nested_auto_cpu(q, v, use_mlp):
    if q.dtype != torch.float32:
        return f"dtype {q.dtype}: the C++ CPU op was measured against the reference in float32 only"
    T, hd = q.shape[2], max(q.shape[-1], v.shape[-1])
    if hd > MAX_AUTO_CPU_NESTED_HEAD_DIM:
        return f"head_dim > {MAX_AUTO_CPU_NESTED_HEAD_DIM}, where the C++ CPU op was not measured faster"
    if T == 16 or (use_mlp and T <= MAX_AUTO_CPU_NESTED_TOKENS):
        return None
    return ("T != 16 without the head-MLP (or T > 256), where the reference is faster on CPU (the C++ op "
            "recomputes q kᵀ in its backward)")


OPS: dict[str, OpSpec] = {
    "inner_attention": OpSpec(
        name="inner_attention",
        implementations={"reference": inner_attention_ref, "cpu": cpp_inner.inner_attention,
                         "cuda": cpp_inner.inner_attention, "triton": triton_inner.inner_attention},
        default_order={"cpu": ("cpu",), "cuda": ("triton", "cuda")},
        unsupported={"cuda": cpp_inner.unsupported_cuda, "triton": triton_inner.unsupported},
        auto_unsupported={"cpu": lambda q, v: (
            None if max(q.shape[-1], v.shape[-1]) <= MAX_AUTO_CPU_HEAD_DIM
            else f"head_dim > {MAX_AUTO_CPU_HEAD_DIM}, where the reference is faster on CPU")},
        limits={"cuda": _cuda_limits("inner_attention"),
                "triton": lambda: {"max_tokens": triton_inner.MAX_TOKENS, "max_head_dim": triton_inner.MAX_HEAD_DIM}},
    ),
    "inner_block": OpSpec(
        name="inner_block",
        implementations={"reference": inner_block_ref, "triton": triton_block.inner_block},
        default_order={"cpu": (), "cuda": ("triton",)},
        unsupported={"triton": triton_block.unsupported},
        limits={"triton": lambda: {"max_words": triton_block.MAX_WORDS, "max_dim": triton_block.MAX_DIM}},
    ),
    "nested_attention": OpSpec(
        name="nested_attention",
        implementations={"reference": nested_attention_ref, "cpu": cpp_nested.nested_attention,
                         "cuda": cpp_nested.nested_attention, "triton": triton_nested.nested_attention},
        # CPU: the C++ op where it was measured faster (_nested_auto_cpu, above)
        default_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
        unsupported={"cuda": cpp_nested.unsupported_cuda, "triton": triton_nested.unsupported},
        auto_unsupported={"cpu": _nested_auto_cpu},
        limits={"cuda": _cuda_limits("nested_attention"),
                "triton": lambda: {"max_tokens": triton_nested.MAX_TOKENS, "max_heads": triton_nested.MAX_HEADS,
                                   "max_head_dim": triton_nested.MAX_HEAD_DIM}},
    ),
    "hsim_split_linear": OpSpec(
        name="hsim_split_linear",
        implementations={"reference": hsim_split_linear_ref, "cpu": cpp_hsim.hsim_split_linear,
                         "cuda": cpp_hsim.hsim_split_linear, "triton": triton_hsim.hsim_split_linear},
        # CPU: the C++ op (N 2304, D 768, H 12, fp32, 2 threads: forward 4.6 ms vs the einsum's 1.3 s)
        default_order={"cpu": ("cpu",), "cuda": ("triton", "cuda")},
        unsupported={"cuda": cpp_hsim.unsupported_cuda, "triton": triton_hsim.unsupported},
        limits={"cuda": _cuda_limits("hsim_split_linear"),
                "triton": lambda: {"max_heads": triton_hsim.MAX_HEADS, "max_head_dim": triton_hsim.MAX_HEAD_DIM}},
    ),
}


def default_order(spec: OpSpec, device: torch.device) -> tuple[str, ...]:
    """The backends `backend=None` tries on `device`, in order (the reference last)."""
    order = spec.default_order.get(device.type, ())
    if device.type == "cuda" and not GPU_KERNELS_VERIFIED:
        order = ()
    return tuple(order) + ("reference",)


def resolve(op: str, backend: str | None, device: torch.device, *fit_args) -> str:
    """The backend that runs `op` on `device` for the input described by `fit_args`.

    Args:
        op: a key of OPS.
        backend: the caller's choice; None means TNTKERNELS_BACKEND if set, else the first backend of
            `default_order` that is implemented, available and covers the input.
        fit_args: passed to the backend's fit checks (`OpSpec.unsupported`).
    Raises:
        ValueError: `backend` is not a known name, or the named backend does not cover the input.
        RuntimeError: the named backend is not implemented for `op` or cannot run on `device`.
    """
    spec = OPS[op]
    if backend is None:
        backend = os.environ.get("TNTKERNELS_BACKEND") or None
    if backend is None:
        for name in default_order(spec, device):
            if name not in spec.implementations or _backend.why_unavailable(name, device) is not None:
                continue
            checks = (spec.unsupported.get(name), spec.auto_unsupported.get(name))
            if all(check is None or check(*fit_args) is None for check in checks):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected None or one of {BACKENDS}")
    if backend not in spec.implementations:
        raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op; "
                           f"implemented: {tuple(spec.implementations)}")
    why = _backend.why_unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {why}")
    check = spec.unsupported.get(backend)
    why = check(*fit_args) if check is not None else None
    if why is not None:
        raise ValueError(f"{op}: the {backend!r} backend does not support {why}")
    return backend


def why_not(op: str, backend: str, device: torch.device, *fit_args) -> str | None:
    """None when the named `backend` implements `op`, can run on `device` and covers the input
    described by `fit_args`, else why not (what `resolve` would raise for it)."""
    spec = OPS[op]
    if backend not in spec.implementations:
        return f"backend {backend!r} is not implemented for {op}"
    why = _backend.why_unavailable(backend, device)
    if why is not None:
        return why
    check = spec.unsupported.get(backend)
    return check(*fit_args) if check is not None else None


def call(op: str, backend: str | None, device: torch.device, fit_args: tuple, *args):
    """resolve(op, backend, device, *fit_args), then run that implementation on `args`."""
    return OPS[op].implementations[resolve(op, backend, device, *fit_args)](*args)

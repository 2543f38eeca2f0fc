"""Input checks shared by the functional ops: each raises ValueError naming what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, ndim: int | None = None, dims: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.layout != torch.strided:  # sparse / jagged layouts: the kernels and the references index dense memory
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None allowed) has `ref`'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                             "all inputs must share one dtype")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all inputs must be on one device")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, dims: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {dims} = {tuple(expected)}, got {tuple(t.shape)}")


def check_scale(op: str, scale) -> float | None:
    if scale is None:
        return None
    try:
        if isinstance(scale, (str, bytes)):
            raise TypeError
        scale = float(scale)
    except (TypeError, ValueError, RuntimeError):  # a string, a list, a tensor of several elements, complex
        raise TypeError(f"{op}: scale must be None or a real number, got {type(scale).__name__} {scale!r}") from None
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"{op}: scale must be a finite float, got {scale}")
    return scale


def check_head_dim(op: str, q: torch.Tensor, dims: str) -> None:
    """head_dim d >= 1: d = 0 has no default scale (d ** -0.5) and no meaning."""
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: q and k must have head_dim d >= 1 in {dims}, got shape {tuple(q.shape)}")

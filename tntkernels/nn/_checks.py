"""Argument checks shared by the modules' constructors and forwards (docs/bad-input.md lists them)."""
from __future__ import annotations

import numbers

import torch

from .. import _backend


def is_positive_int(value) -> bool:
    """An int >= 1 (numpy ints too; not a bool, not a float): a size or a head count."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def check_positive_int(owner: str, **values) -> None:
    for name, value in values.items():
        if not is_positive_int(value):
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_backend(owner: str, backend) -> None:
    """`backend` is None or a known backend name (whether it can run is decided at forward)."""
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"{owner}: unknown backend {backend!r}; expected None or one of {_backend.BACKENDS}")


def check_is_tensor(owner: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_2x_pytorch(ours: torch.Tensor, pytorch: torch.Tensor, exact: torch.Tensor, floor: float, what: str = ""):
    """The rule from flash-attention's tests: our error against an fp64 oracle is at most twice
    PyTorch's own error in the same dtype, plus a small floor."""
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    ours_err, torch_err = max_err(ours, exact), max_err(pytorch, exact)
    assert ours_err <= 2 * torch_err + floor, f"{what}: error {ours_err:.3e} > 2 x PyTorch's {torch_err:.3e} + {floor:.0e}"


os.environ.setdefault("TNTKERNELS_TEST", "1")

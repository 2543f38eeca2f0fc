"""The correctness rule every kernel test uses (from flash-attention's tests): against an fp64
oracle, our error is at most twice PyTorch's own error in the same dtype, plus a small floor, on
the output and on every gradient."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_2x_pytorch(ours: torch.Tensor, pytorch: torch.Tensor, exact: torch.Tensor, floor: float, what: str = ""):
    """Our error against the fp64 oracle is at most 2× PyTorch's error in the same dtype + floor."""
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    ours_err, torch_err = max_err(ours, exact), max_err(pytorch, exact)
    assert ours_err <= 2 * torch_err + floor, f"{what}: error {ours_err:.3e} > 2 x PyTorch's {torch_err:.3e} + {floor:.0e}"


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]):
    """fn(*inputs) and the gradients of its outputs (weighted by grad_outputs) for every input that
    requires grad; inputs are detached copies, so the caller's tensors are untouched."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(list(outs), wanted, list(grad_outputs), allow_unused=True) if wanted else ()
    return [o.detach() for o in outs], [g if g is None else g.detach() for g in grads]


def check_2x_rule(ours: Callable, reference: Callable, inputs: Sequence[torch.Tensor],
                  grad_outputs: Sequence[torch.Tensor], floor: float, names: Sequence[str] = ()) -> None:
    """The whole rule in one call: `ours` and `reference` (same signature) on `inputs` (requires_grad
    marks the differentiable ones), compared output by output and gradient by gradient against the
    reference in float64."""
    ours_out, ours_grads = outputs_and_grads(ours, inputs, grad_outputs)
    low_out, low_grads = outputs_and_grads(reference, inputs, grad_outputs)
    exact_out, exact_grads = outputs_and_grads(
        reference, [t.double().requires_grad_(t.requires_grad) for t in inputs], [g.double() for g in grad_outputs])
    labels = list(names) or [f"out{i}" for i in range(len(ours_out))] + [f"grad{i}" for i in range(len(ours_grads))]
    for label, a, b, c in zip(labels, ours_out + ours_grads, low_out + low_grads, exact_out + exact_grads):
        if c is None:
            assert a is None or not a.abs().sum(), f"{label}: expected no gradient"
            continue
        assert_2x_pytorch(a, b, c, floor, label)

"""The one autograd recipe of every kernel op (tntkernels/ops/_autograd.py): first order through the
kernel, only for the inputs that need a gradient; double backward through the reference."""
from __future__ import annotations

import pytest
import torch

import tntkernels
from tntkernels.ops._autograd import register_kernel_autograd

CALLS: list[tuple] = []


@torch.library.custom_op("tntkernels_test::mix", mutates_args=())
def _mix(x: torch.Tensor, ws: list[torch.Tensor], b: torch.Tensor | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = alpha * (x @ ws[0]) @ ws[1] + (b if b is not None else 0)
    return y, y.abs().amax(-1)  # a second, non-differentiable output (like a log-sum-exp)


@_mix.register_fake
def _mix_fake(x, ws, b, alpha):
    y = x.new_empty((x.shape[0], ws[1].shape[1]))
    return y, y.new_empty((x.shape[0],))


def _mix_ref(x, ws, b, alpha):
    return alpha * (x @ ws[0]) @ ws[1] + (b if b is not None else 0)


def _mix_backward(inputs, outputs, grads, needs):
    """A 'kernel' backward that computes every gradient, and records what it was asked for."""
    x, (w0, w1), b, alpha = inputs
    (y,) = outputs
    (g,) = grads
    CALLS.append(needs)
    h = x @ w0
    return (alpha * g @ w1.T @ w0.T, [alpha * x.T @ (g @ w1.T), alpha * h.T @ g],
            (g.sum(0) if b is not None else None), None)


register_kernel_autograd(_mix, reference=_mix_ref, backward=_mix_backward, saved_outputs=(0,), non_differentiable=(1,))


def _leaves(requires=(True, True, True, True), dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x, w0, w1 = (torch.randn(*s, generator=g, dtype=dtype) for s in ((5, 3), (3, 4), (4, 2)))
    b = torch.randn(2, generator=g, dtype=dtype)
    return [t.requires_grad_(r) for t, r in zip((x, w0, w1, b), requires)]


def test_first_order_goes_through_the_kernel_and_matches_the_reference():
    CALLS.clear()
    x, w0, w1, b = _leaves()
    y, _ = _mix(x, [w0, w1], b, 0.5)
    grads = torch.autograd.grad(y.square().sum(), (x, w0, w1, b))
    ref = torch.autograd.grad(_mix_ref(x, [w0, w1], b, 0.5).square().sum(), (x, w0, w1, b))
    assert len(CALLS) == 1
    for ours, exact in zip(grads, ref):
        torch.testing.assert_close(ours, exact)


def test_only_the_gradients_asked_for():
    CALLS.clear()
    x, w0, w1, b = _leaves(requires=(False, True, False, False))
    y, _ = _mix(x, [w0, w1], b, 0.5)
    (gw0,) = torch.autograd.grad(y.sum(), (w0,))
    assert CALLS == [(False, [True, False], False, False)]
    torch.testing.assert_close(gw0, torch.autograd.grad(_mix_ref(x, [w0, w1], b, 0.5).sum(), (w0,))[0])


def test_non_differentiable_output_carries_no_gradient():
    x, w0, w1, b = _leaves()
    y, amax = _mix(x, [w0, w1], b, 0.5)
    assert y.requires_grad and not amax.requires_grad


def test_double_backward_differentiates_the_reference():
    CALLS.clear()
    x, w0, w1, b = _leaves()
    torch.autograd.gradgradcheck(lambda *t: _mix(t[0], [t[1], t[2]], t[3], 0.5)[0], (x, w0, w1, b))
    assert CALLS == []  # create_graph=True never reaches the kernel's first-order backward


@pytest.mark.cpp
@pytest.mark.parametrize("op", ["inner_attention", "nested_attention", "hsim_split_linear"])
def test_compiled_ops_return_only_what_is_asked(op):
    """Through the C++ ops: a gradient for exactly the inputs that require one, equal to the reference."""
    g = torch.Generator().manual_seed(1)
    if op == "hsim_split_linear":
        x = torch.randn(6, 12, generator=g, dtype=torch.float64)
        M, m = torch.randn(4, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
        A, a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
        inputs, want = [x, M, m, A, a], [1, 3]
        ours_fn = lambda *t: tntkernels.hsim_split_linear(*t, backend="cpu")  # noqa: E731
        ref_fn = tntkernels.hsim_split_linear_ref
    else:
        q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
        inputs, want = [q, k, v], [1]
        if op == "inner_attention":
            ours_fn = lambda *t: tntkernels.inner_attention(*t, backend="cpu")  # noqa: E731
            ref_fn = tntkernels.inner_attention_ref
        else:
            ours_fn = lambda *t: tntkernels.nested_attention(*t, backend="cpu")[0]  # noqa: E731
            ref_fn = lambda *t: tntkernels.nested_attention_ref(*t)[0]  # noqa: E731
    leaves = [t.clone().requires_grad_(i in want) for i, t in enumerate(inputs)]
    out = ours_fn(*leaves)
    got = torch.autograd.grad(out.square().sum(), [leaves[i] for i in want])
    ref_leaves = [t.clone().requires_grad_(i in want) for i, t in enumerate(inputs)]
    exact = torch.autograd.grad(ref_fn(*ref_leaves).square().sum(), [ref_leaves[i] for i in want])
    for a_, b_ in zip(got, exact):
        torch.testing.assert_close(a_, b_)
    assert all(leaves[i].grad is None for i in range(len(leaves)))


@pytest.mark.interpreter
def test_triton_hsim_skips_the_weight_gradient_kernel_nobody_asked_for(monkeypatch):
    """x needs a gradient, the weights do not: the block weight-gradient kernel never launches."""
    from tntkernels.ops.triton import hsim_split_linear as hs

    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(hs, "_hsim_split_linear_wgrad_kernel", Recorder(hs._hsim_split_linear_wgrad_kernel))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    M, m = torch.randn(4, 2, 2, generator=g), torch.randn(4, 2, generator=g)
    A, a = torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, generator=g)
    y = tntkernels.hsim_split_linear(x, M, m, A, a, backend="triton")
    (dx,) = torch.autograd.grad(y.square().sum(), (x,))
    assert launched == []
    xr = x.detach().clone().requires_grad_()
    (exact,) = torch.autograd.grad(tntkernels.hsim_split_linear_ref(xr, M, m, A, a).square().sum(), (xr,))
    torch.testing.assert_close(dx, exact, rtol=1e-4, atol=1e-4)
    A.requires_grad_()
    y = tntkernels.hsim_split_linear(x, M, m, A, a, backend="triton")
    torch.autograd.grad(y.sum(), (A,))
    assert len(launched) == 1

"""One autograd recipe for every kernel op: first order through the kernel, higher orders through
the reference.

Every compiled op of the package (C++ CPU, CUDA C++ and Triton custom ops) registers its autograd
with `register_kernel_autograd`:

- the forward saves the op's tensor inputs (lists of tensors and optional tensors included) and the
  outputs the backward kernel needs; outputs such as the log-sum-exp are marked non-differentiable;
- the backward runs the family's backward kernel, and returns a gradient only for the inputs that
  need one (`ctx.needs_input_grad`); when no input needs one, no kernel runs;
- when the backward itself is being differentiated (`create_graph=True`: double backward, gradient
  penalties, `gradgradcheck`), it differentiates the family's pure-PyTorch reference instead, so
  second-order gradients are exact rather than silently missing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# backward(inputs, outputs, grads, needs) -> one gradient per input, with the inputs' structure
BackwardKernel = Callable[[tuple, tuple, tuple, tuple], Sequence]


def _flatten(inputs: Sequence) -> tuple[list[torch.Tensor], list]:
    """The tensors among `inputs` (inside lists too), and a layout to rebuild `inputs` from them."""
    tensors, layout = [], []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            layout.append(("t", len(tensors)))
            tensors.append(x)
        elif isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
            layout.append(("l", list(range(len(tensors), len(tensors) + len(x)))))
            tensors.extend(x)
        else:  # None, or a non-tensor attribute (scale, eps, num_heads, ...)
            layout.append(("v", x))
    return tensors, layout


def _unflatten(layout: list, tensors: Sequence[torch.Tensor]) -> tuple:
    out = []
    for kind, value in layout:
        out.append(tensors[value] if kind == "t" else [tensors[i] for i in value] if kind == "l" else value)
    return tuple(out)


def _mask(grads: Sequence, needs: Sequence) -> tuple:
    """Keep the gradients of the inputs that need one (None elsewhere), list inputs element-wise."""
    out = []
    for g, n in zip(grads, needs):
        if isinstance(n, (list, tuple)):
            g = list(g) if g is not None else [None] * len(n)
            out.append([gi if ni else None for gi, ni in zip(g, n)])
        else:
            out.append(g if n else None)
    return tuple(out)


def _any(needs: Sequence) -> bool:
    return any(_any(n) if isinstance(n, (list, tuple)) else bool(n) for n in needs)


def _reference_grads(reference: Callable, inputs: tuple, grads: tuple, needs: tuple) -> tuple:
    """Gradients of the reference's outputs (weighted by `grads`) with respect to the inputs that
    need one, with create_graph=True; None for the others."""
    wanted, slots = [], []
    for i, (x, n) in enumerate(zip(inputs, needs)):
        if isinstance(n, (list, tuple)):
            for j, (t, nj) in enumerate(zip(x, n)):
                if nj:
                    wanted.append(t)
                    slots.append((i, j))
        elif n:
            wanted.append(x)
            slots.append((i, None))
    with torch.enable_grad():
        outs = reference(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                              allow_unused=True)
    result = [([None] * len(n) if isinstance(n, (list, tuple)) else None) for n in needs]
    for (i, j), g in zip(slots, got):
        if j is None:
            result[i] = g
        else:
            result[i][j] = g
    return tuple(result)


def register_kernel_autograd(op, *, reference: Callable, backward: BackwardKernel,
                             saved_outputs: Sequence[int] = (), non_differentiable: Sequence[int] = ()) -> None:
    """Register autograd for a kernel op: first order through `backward`, double backward through
    `reference`.

    Args:
        op: the op's qualified name ("tntkernels::inner_attention") or a `torch.library.custom_op`.
        reference: `reference(*inputs)` -> the op's differentiable outputs (a tensor or a tuple, in the
            op's output order, the `non_differentiable` ones left out), in plain PyTorch.
        backward: `backward(inputs, outputs, grads, needs)` -> one gradient per input, with the inputs'
            structure (a list for a list input; None where there is none). `inputs` as the op received
            them; `outputs` the op's outputs listed in `saved_outputs`; `grads` the gradients of the
            differentiable outputs (None where nobody asked for that output's gradient); `needs`
            `ctx.needs_input_grad` (a list for a list input), which a kernel may use to skip work.
            Gradients of inputs that do not need one are dropped here.
        saved_outputs: indices of the op's outputs that `backward` reads.
        non_differentiable: indices of outputs that carry no gradient (e.g. a log-sum-exp).
    """
    non_differentiable = tuple(non_differentiable)
    saved_outputs = tuple(saved_outputs)

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        for i in non_differentiable:
            ctx.mark_non_differentiable(outs[i])
        tensors, layout = _flatten(inputs)
        ctx.layout = layout
        ctx.n_inputs = len(tensors)
        ctx.save_for_backward(*tensors, *(outs[i] for i in saved_outputs))

    def backward_fn(ctx, *grad_outputs):
        needs = tuple(ctx.needs_input_grad)
        grads = tuple(g for i, g in enumerate(grad_outputs) if i not in non_differentiable)
        if not _any(needs) or all(g is None for g in grads):
            return _mask([None] * len(needs), needs)  # None everywhere, lists for list inputs
        saved = ctx.saved_tensors
        inputs = _unflatten(ctx.layout, saved[:ctx.n_inputs])
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference, exactly
            return _reference_grads(reference, inputs, grads, needs)
        return _mask(backward(inputs, tuple(saved[ctx.n_inputs:]), grads, needs), needs)

    if isinstance(op, str):
        torch.library.register_autograd(op, backward_fn, setup_context=setup_context)
    else:
        op.register_autograd(backward_fn, setup_context=setup_context)

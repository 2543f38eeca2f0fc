"""Every GPU kernel on tensors of a second GPU while the current device is the first: launches must
run under the tensors' device and stream (a kernel launched on device 0 with pointers of device 1
reads another device's memory). Needs two CUDA devices; skipped otherwise."""
import pytest
import torch

from helpers.inputs import attention_inputs, hsim_inputs, inner_block_inputs, nested_inputs
from tntkernels.ops import (hsim_split_linear, hsim_split_linear_ref, inner_attention, inner_attention_ref,
                            inner_block, inner_block_ref, nested_attention, nested_attention_ref)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")]
BACKENDS = [pytest.param("cuda", marks=pytest.mark.cuda_ext), pytest.param("triton", marks=pytest.mark.triton)]
DEV = "cuda:1"


def _check(fn, ref, inputs, grad):
    """fn on cuda:1 (current device cuda:0) against ref on the CPU: outputs and input gradients."""
    assert torch.cuda.current_device() == 0
    ours_in = [t.to(DEV).float().requires_grad_() if t is not None else None for t in inputs]
    ref_in = [t.float().requires_grad_() if t is not None else None for t in inputs]
    ours, want = fn(*ours_in), ref(*ref_in)
    assert ours.device == torch.device(DEV)
    torch.testing.assert_close(ours.cpu(), want, atol=1e-4, rtol=1e-4)
    ours.backward(grad.to(DEV).float())
    want.backward(grad.float())
    torch.cuda.synchronize(DEV)
    for a, b in zip(ours_in, ref_in):
        if a is not None:
            torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_attention_on_second_device(backend):
    q, k, v, g = attention_inputs(300, 4, 16, 6)
    _check(lambda *a: inner_attention(*a, backend=backend), inner_attention_ref, (q, k, v), g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_attention_on_second_device(backend):
    q, k, v, prev, mlp, _, g, _ = nested_inputs(50, 4, 16, 6)
    _check(lambda q, k, v, p, *m: nested_attention(q, k, v, p, head_mlp=m, backend=backend)[0],
           lambda q, k, v, p, *m: nested_attention_ref(q, k, v, p, m)[0], (q, k, v, prev, *mlp), g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hsim_split_linear_on_second_device(backend):
    x, params, g = hsim_inputs((257,), 12, 16)
    _check(lambda *a: hsim_split_linear(*a, backend=backend), hsim_split_linear_ref, (x, *params), g)


@pytest.mark.triton
def test_inner_block_on_second_device():
    x, params, g, _ = inner_block_inputs(40, 16, 24, 4)
    names = list(params)
    _check(lambda x, *p: inner_block(x, dict(zip(names, p)), num_heads=4, backend="triton"),
           lambda x, *p: inner_block_ref(x, dict(zip(names, p)), num_heads=4), (x, *params.values()), g)

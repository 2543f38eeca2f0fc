"""CUDA C++ inner attention (torch.ops.tntkernels.inner_attention on CUDA tensors): strided operands,
the block-stride loop, −inf rows, the m ≤ 64 domain, the opt-in shared-memory path. The 2×-PyTorch
accuracy tests over the common shapes are in tests/ops/test_inner_attention.py and tests/ops/test_fuzz.py."""
import math

import pytest
import torch

from tntkernels import inner_attention, inner_attention_ref
from helpers.inputs import attention_inputs
from helpers.oracle import check_2x_rule


def run(q, k, v, g, scale=None):
    """out and (dq, dk, dv) of the "cuda" backend for leaves made of q, k, v (their strides kept)."""
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = inner_attention(*xs, scale=scale, backend="cuda")
    return out.detach(), torch.autograd.grad(out, xs, g)


@pytest.mark.cpp
@pytest.mark.cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["qkv", "t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 4, 16, 6), (3, 3, 9, 10), (2, 2, 64, 64)])
def test_cuda_strided_views_equal_contiguous_copies(shape, dtype, layout):
    """timm's permuted / unbound qkv views and token-major buffers go in as they are (no copy) and give
    bit for bit the results of contiguous copies: the kernels read through the strides, and nothing in the
    launch depends on them."""
    S, H, m, d = shape
    q, k, v, g = attention_inputs(S, H, m, d, layout=layout, dtype=dtype, device="cuda")
    assert not q.is_contiguous() and not v.is_contiguous()
    g = g.transpose(1, 2).contiguous().transpose(1, 2)  # a strided upstream gradient too
    out_s, grads_s = run(q, k, v, g)
    out_c, grads_c = run(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous())
    assert torch.equal(out_s, out_c)
    for a, b in zip(grads_s, grads_c):
        assert torch.equal(a, b)


@pytest.mark.cpp
@pytest.mark.cuda_ext
@pytest.mark.gpu
def test_cuda_op_allocates_only_its_outputs():
    """With the views of one qkv Linear output, the forward allocates out and lse and the backward dq, dk,
    dv: no contiguous copies of the operands."""
    q, k, v, g = attention_inputs(8, 4, 16, 6, layout="qkv", dtype=torch.float32, device="cuda")
    g = g.transpose(1, 2).contiguous().transpose(1, 2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    out, lse = torch.ops.tntkernels.inner_attention(q, k, v, 0.4)
    middle = torch.cuda.memory_stats()["allocation.all.allocated"]
    grads = torch.ops.tntkernels.inner_attention_backward(g, q, k, v, out, lse, 0.4)
    after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert middle - before == 2, f"forward: {middle - before} allocations (out, lse expected)"
    assert after - middle == 3, f"backward: {after - middle} allocations (dq, dk, dv expected)"
    assert all(t.is_contiguous() for t in (out, lse, *grads))


@pytest.mark.cpp
@pytest.mark.cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(40, 4, 16, 6, 6), (13, 3, 17, 64, 33), (9, 2, 64, 64, 64), (1000, 1, 1, 3, 2)])
def test_cuda_block_stride_loop(grid_cap_3, shape, dtype, floor):
    """Grid capped at 3 blocks: each block walks several groups of pairs (the last one partial); m = d = 64
    needs more than the default 48 KB of shared memory per block."""
    q, k, v, dout = (t.to(dtype) for t in attention_inputs(*shape, dtype=torch.float64, device="cuda"))
    check_2x_rule(lambda *a: inner_attention(*a, backend="cuda"), inner_attention_ref,
                  [t.requires_grad_() for t in (q, k, v)], [dout], floor, names=("out", "dq", "dk", "dv"))


@pytest.mark.cpp
@pytest.mark.cuda_ext
@pytest.mark.gpu
def test_cuda_float64_at_the_largest_shape():
    """float64 at m = d = dv = 64: the largest shared-memory request (unpadded tiles, 161 KB backward)."""
    q, k, v, g = attention_inputs(3, 2, 64, 64, dtype=torch.float64, device="cuda")
    out, grads = run(q, k, v, g, 0.3)
    xs = [t.cpu().requires_grad_() for t in (q, k, v)]
    want = inner_attention_ref(*xs, 0.3)
    torch.testing.assert_close(out.cpu(), want.detach(), atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, torch.autograd.grad(want, xs, g.cpu())):
        torch.testing.assert_close(a.cpu(), b, atol=1e-11, rtol=1e-9)


@pytest.mark.cpp
@pytest.mark.cuda_ext
@pytest.mark.gpu
def test_cuda_all_minus_inf_row_stays_in_its_row():
    """Row 0 of pair (0, 0) has every logit −inf (q = +inf meets negative keys): no softmax, NaN there as
    in the reference; every other row of that block (several pairs share one) stays finite and right,
    forward and backward (the gradients of pair (0, 0) are NaN in the reference too)."""
    q, k, v, g = attention_inputs(5, 4, 16, 6, dtype=torch.float64)
    q[0, 0, 0, 0] = math.inf
    k[0, 0, :, 0] = -k[0, 0, :, 0].abs() - 0.1
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = inner_attention_ref(*xs)
    want_grads = torch.autograd.grad(want, xs, g)
    out, grads = run(q.float().cuda(), k.float().cuda(), v.float().cuda(), g.float().cuda())
    out = out.cpu().double()
    assert torch.isnan(want[0, 0, 0]).all() and torch.isnan(out[0, 0, 0]).all()
    keep = torch.ones(out.shape[:3], dtype=torch.bool)
    keep[0, 0, 0] = False
    assert torch.isfinite(out[keep]).all()
    torch.testing.assert_close(out[keep], want.detach()[keep], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, want_grads):
        a = a.cpu().double()
        assert torch.isfinite(a[1:]).all() and torch.isfinite(a[0, 1:]).all()
        torch.testing.assert_close(a[1:], b[1:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a[0, 1:], b[0, 1:], atol=1e-5, rtol=1e-4)


@pytest.mark.cpp
@pytest.mark.cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("m,d,dv,match", [(65, 6, 6, r"m \(tokens per sequence\) must be <= 64"),
                                          (16, 65, 6, r"head_dim d and dv must be <= 64"),
                                          (16, 6, 65, r"head_dim d and dv must be <= 64")])
def test_cuda_op_refuses_outside_its_domain(m, d, dv, match):
    q = torch.randn(2, 2, m, d, device="cuda")
    v = torch.randn(2, 2, m, dv, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tntkernels.inner_attention(q, q, v, 1.0)

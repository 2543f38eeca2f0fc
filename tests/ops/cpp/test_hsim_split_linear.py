"""Compiled H_sim-split linear op (torch.ops.tntkernels.hsim_split_linear): C++ CPU op and CUDA kernels
against the reference `hsim_split_linear_ref` (docs/tint.md §1)."""
import pytest
import torch

from tntkernels import _backend
from tntkernels import hsim_split_linear, hsim_split_linear_ref


def hsim_split_linear_compiled(x, mix_weight=None, mix_bias=None, block_weight=None, block_bias=None):
    """The compiled op of x's device ("cpu" or "cuda" backend) through the public function."""
    return hsim_split_linear(x, mix_weight, mix_bias, block_weight, block_bias, backend=x.device.type)
from helpers.inputs import hsim_inputs
from helpers.oracle import assert_2x_pytorch

needs_cpp = pytest.mark.cpp
needs_cuda_build = pytest.mark.cuda_ext

# which of (mix_weight, mix_bias, block_weight, block_bias) are given
STRUCTS = {  # which of (M, m, A, a) are present
    "mix+block": (True, True, True, True),
    "mix": (True, True, False, False),
    "block": (False, False, True, True),
    "mix+block,no biases": (True, False, True, False),
    "mix,no bias": (True, False, False, False),
    "block,no bias": (False, False, True, False),
}


def make(lead, H, d, struct, dtype=torch.float64, device="cpu", seed=0):
    """x (*lead, H·d) and the parameters (None where absent), from helpers.inputs: every parameter
    is drawn, then the absent ones dropped, so each structure sees the same values."""
    x, params, _ = hsim_inputs(tuple(lead), H, d, dtype=dtype, device=device, seed=seed)
    return x, tuple(t if on else None for t, on in zip(params, STRUCTS[struct]))


def present(x, params):
    return [x] + [t for t in params if t is not None]


def rebuild(params, ts):
    """params with the present entries replaced by ts (in order)."""
    it = iter(ts)
    return tuple(next(it) if p is not None else None for p in params)


@needs_cpp
@pytest.mark.parametrize("struct", list(STRUCTS))
@pytest.mark.parametrize("lead,H,d", [((5,), 3, 2), ((2, 3), 2, 3), ((4,), 1, 4)])
def test_cpu_gradcheck_fp64(struct, lead, H, d):
    x, params = make(lead, H, d, struct)
    xs = [t.requires_grad_() for t in present(x, params)]
    f = lambda xx, *ps: hsim_split_linear_compiled(xx, *rebuild(params, ps))  # noqa: E731
    assert torch.autograd.gradcheck(f, xs)


@needs_cpp
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block"])
def test_cpu_gradgradcheck(struct):
    x, params = make((3,), 2, 3, struct)
    xs = [t.requires_grad_() for t in present(x, params)]
    f = lambda xx, *ps: hsim_split_linear_compiled(xx, *rebuild(params, ps))  # noqa: E731
    assert torch.autograd.gradgradcheck(f, xs)


@needs_cpp
@pytest.mark.parametrize("struct", list(STRUCTS))
@pytest.mark.parametrize("lead,H,d", [((7,), 3, 5), ((2, 50), 12, 16), ((33,), 1, 64), ((6,), 4, 1)])
def test_cpu_fp64_matches_reference_and_spec_gradients(struct, lead, H, d):
    x, params = make(lead, H, d, struct)
    out = hsim_split_linear_compiled(x, *params)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out, hsim_split_linear_ref(x, *params), atol=1e-12, rtol=0)
    # the backward op against the spec's gradient formulas
    M, m, A, a = params
    N = x.numel() // (H * d)
    x2 = x.reshape(N, H * d)
    dy = torch.randn(N, H, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dx, dM, dm, dA, da = torch.ops.tntkernels.hsim_split_linear_backward(dy.reshape(N, -1), x2, *params)
    xs = x2.reshape(N, H, d)
    z = torch.einsum("nhk,khg->ngk", xs, M) + (m.t() if m is not None else 0) if M is not None else xs
    dz = torch.einsum("ngj,gkj->ngk", dy, A) if A is not None else dy
    dx_ref = torch.einsum("ngk,khg->nhk", dz, M) if M is not None else dz
    assert torch.allclose(dx, dx_ref.reshape(N, -1), atol=1e-12)
    for got, want in ((dM, torch.einsum("nhk,ngk->khg", xs, dz) if M is not None else None),
                      (dm, dz.sum(0).t() if m is not None else None),
                      (dA, torch.einsum("ngk,ngj->gkj", z, dy) if A is not None else None),
                      (da, dy.sum(0) if a is not None else None)):
        if want is None:
            assert got.numel() == 0
        else:
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-11)


@needs_cpp
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block,no bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(struct, dtype):
    x, params = make((9,), 3, 4, struct, dtype=dtype)
    for t in present(x, params):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.tntkernels.hsim_split_linear.default, (x, *params))
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    bargs = (torch.randn_like(x), x.detach(), *(det(t) for t in params))
    torch.library.opcheck(torch.ops.tntkernels.hsim_split_linear_backward.default, bargs)


SHAPES_2X = [  # (leading dims, H, d): awkward sizes
    ((0,), 3, 5),
    ((1,), 12, 16),
    ((7,), 3, 5),
    ((100,), 12, 64),
    ((4, 25), 1, 64),
    ((3, 7), 12, 1),
    ((100,), 3, 16),
]


def check_2x(lead, H, d, struct, dtype, floor, device, transpose=False):
    x64, p64 = make(lead, H, d, struct, device=device)
    xl, pl = make(lead, H, d, struct, dtype=dtype, device=device)
    xo, po = make(lead, H, d, struct, dtype=dtype, device=device)
    if transpose:  # a non-contiguous x with the same values
        xo = xo.transpose(0, -1).contiguous().transpose(0, -1)
        assert not xo.is_contiguous() or xo.numel() <= 1
    exact_in = [t.requires_grad_() for t in present(x64, p64)]
    low_in = [t.requires_grad_() for t in present(xl, pl)]
    ours_in = [t.requires_grad_() for t in present(xo, po)]
    exact = hsim_split_linear_ref(x64, *p64)
    low = hsim_split_linear_ref(xl, *pl)
    ours = hsim_split_linear_compiled(xo, *po)
    assert ours.dtype == dtype and ours.shape == x64.shape
    assert_2x_pytorch(ours, low, exact, floor, "y")
    gy = torch.randn(x64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    exact.backward(gy)
    low.backward(gy.to(dtype))
    ours.backward(gy.to(dtype))
    N = x64.numel() // max(1, H * d)
    names = ["dx"] + [n for n, p in zip(["dM", "dm", "dA", "da"], p64) if p is not None]
    for name, a, b, c in zip(names, ours_in, low_in, exact_in):
        fl = floor * (max(1, N) if name != "dx" else 1) * (H * d if name == "dx" else 1) ** 0.5
        assert_2x_pytorch(a.grad, b.grad, c.grad, fl, name)


@needs_cpp
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block", "mix+block,no biases"])
@pytest.mark.parametrize("shape", SHAPES_2X)
def test_cpu_2x_rule(shape, struct, dtype, floor):
    check_2x(*shape, struct, dtype, floor, "cpu")


@needs_cpp
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_2x_rule_non_contiguous_x(dtype, floor):
    check_2x((6, 5), 3, 4, "mix+block", dtype, floor, "cpu", transpose=True)


def _all_results(struct, dtype, device, lead=(300,), H=12, d=16):
    x, params = make(lead, H, d, struct, dtype=dtype, device=device)
    xs = [t.requires_grad_() for t in present(x, params)]
    y = hsim_split_linear_compiled(xs[0], *rebuild(params, xs[1:]))
    grads = torch.autograd.grad(y.float().square().sum(), xs)
    return [y.detach(), *grads]


@needs_cpp
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_deterministic_across_thread_counts(struct, dtype):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_results(struct, dtype, "cpu", lead=(1000,))
        torch.set_num_threads(2)
        two = _all_results(struct, dtype, "cpu", lead=(1000,))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
def test_cpu_identity_without_parts_and_empty_rows():
    x = torch.randn(4, 6)
    assert torch.equal(hsim_split_linear_compiled(x), x)
    x, params = make((0,), 3, 4, "mix+block")
    xs = [t.requires_grad_() for t in present(x, params)]
    y = hsim_split_linear_compiled(xs[0], *rebuild(params, xs[1:]))
    assert y.shape == (0, 12)
    grads = torch.autograd.grad(y.sum(), xs)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, xs))


@needs_cpp
def test_compiled_op_traces_under_torch_compile():
    x, params = make((5,), 3, 4, "mix+block", dtype=torch.float32)
    f = torch.compile(lambda *a: hsim_split_linear_compiled(*a) * 2, fullgraph=True, backend="eager")
    assert torch.allclose(f(x, *params), 2 * hsim_split_linear_ref(x, *params), atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(3, 4, 12)), r"x must be 2-D \(N, D\)"),
    (dict(x=torch.randint(0, 3, (3, 12))), r"x must be float16, bfloat16, float32 or float64"),
    (dict(M=None), r"mix_bias given without mix_weight"),
    (dict(A=None), r"block_bias given without block_weight"),
    (dict(M=torch.randn(4, 3, 2)), r"mix_weight must be 3-D \(d, H, H\)"),
    (dict(M=torch.randn(4, 3, 3, dtype=torch.float64)), r"mix_weight has dtype Double but x has Float"),
    (dict(m=torch.randn(3, 4)), r"mix_bias must have shape \(d, H\)"),
    (dict(A=torch.randn(3, 4, 5)), r"block_weight must have shape \(H, d, d\)"),
    (dict(a=torch.randn(4, 3)), r"block_bias must have shape \(H, d\)"),
    (dict(x=torch.randn(3, 13)), r"x's last dim D=13 must equal H·d"),
])
def test_bad_inputs(change, match):
    a = dict(x=torch.randn(3, 12), M=torch.randn(4, 3, 3), m=torch.randn(4, 3), A=torch.randn(3, 4, 4),
             a=torch.randn(3, 4))
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tntkernels.hsim_split_linear(a["x"], a["M"], a["m"], a["A"], a["a"])


@needs_cpp
def test_bad_backward_inputs():
    x, M, A = torch.randn(3, 12), torch.randn(4, 3, 3), torch.randn(3, 4, 4)
    with pytest.raises(RuntimeError, match=r"grad_y must have x's shape"):
        torch.ops.tntkernels.hsim_split_linear_backward(torch.randn(3, 11), x, M, None, A, None)
    with pytest.raises(RuntimeError, match=r"grad_y has dtype"):
        torch.ops.tntkernels.hsim_split_linear_backward(x.double(), x, M, None, A, None)


@needs_cpp
def test_python_entry_rejects_0d():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., D\), got a 0-d tensor"):
        hsim_split_linear_compiled(torch.tensor(1.0))


# ---------------------------------------------------------------- CUDA


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
def test_cuda_rejects_unsupported_sizes():
    x = torch.randn(4, 65 * 2, device="cuda")
    with pytest.raises(RuntimeError, match=r"supports H <= 64 heads and head width d <= 256"):
        torch.ops.tntkernels.hsim_split_linear(x, torch.randn(2, 65, 65, device="cuda"), None, None, None)
    x = torch.randn(4, 2 * 257, device="cuda")
    with pytest.raises(RuntimeError, match=r"supports H <= 64 heads and head width d <= 256"):
        torch.ops.tntkernels.hsim_split_linear(x, None, None, torch.randn(2, 257, 257, device="cuda"), None)
    x = torch.randn(4, 12, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"supports float32, float16 and bfloat16"):
        torch.ops.tntkernels.hsim_split_linear(x, None, None, torch.randn(3, 4, 4, device="cuda").double(), None)


CUDA_SHAPES = SHAPES_2X + [((2304,), 12, 256), ((513,), 64, 8), ((70, 3), 5, 200), ((1000,), 2, 33)]


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block", "mix+block,no biases"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_2x_rule(shape, struct, dtype, floor):
    check_2x(*shape, struct, dtype, floor, "cuda")


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_2x_rule_non_contiguous_x(dtype):
    check_2x((6, 5), 3, 4, "mix+block", dtype, 1e-5 if dtype == torch.float32 else 2e-2, "cuda", transpose=True)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_deterministic(struct, dtype):
    one = _all_results(struct, dtype, "cuda", lead=(2304,), H=12, d=256)
    two = _all_results(struct, dtype, "cuda", lead=(2304,), H=12, d=256)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
def test_cuda_many_rows_past_grid_limits():
    # 300,000 rows · 12 heads: a large case for the cuBLAS head views and the mix kernels' chunking (the grid-stride
    # loops themselves are covered by the grid_cap_3 tests)
    x, params = make((300_000,), 12, 8, "mix+block", dtype=torch.float32, device="cuda")
    y = hsim_split_linear_compiled(x, *params)
    assert torch.allclose(y, hsim_split_linear_ref(x, *params), atol=1e-4)
    tail = hsim_split_linear_ref(x[-5:].double(), *(t.double() for t in params))
    assert torch.allclose(y[-5:].double(), tail, atol=1e-4)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("struct", ["mix+block", "block,no bias"])
def test_cuda_matches_cpu_op_fp32(struct):
    cpu = _all_results(struct, torch.float32, "cpu", lead=(77,), H=5, d=24)
    gpu = _all_results(struct, torch.float32, "cuda", lead=(77,), H=5, d=24)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-4, rtol=1e-4)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("struct", ["mix+block", "mix", "block", "mix+block,no biases"])
def test_cuda_grid_stride_loops(grid_cap_3, struct, dtype, floor):
    """Row tiles, mix elements, reductions and column sums on 3 blocks: every kernel walks its loop."""
    check_2x((70, 3), 5, 40, struct, dtype, floor, "cuda")


@needs_cpp
def test_grid_cap_hook_round_trips():
    import tntkernels._C as C

    assert C._set_grid_cap_for_tests(5) == 0
    assert C._set_grid_cap_for_tests(0) == 5
    with pytest.raises(RuntimeError, match="blocks must be >= 0"):
        C._set_grid_cap_for_tests(-1)

"""Compiled nested-logit attention (torch.ops.tntkernels.nested_attention): C++ CPU op and CUDA kernels
against the reference `nested_attention_ref`."""
import pytest
import torch

from tntkernels import _backend
from tntkernels import nested_attention, nested_attention_ref


def nested_attention_compiled(q, k, v, prev_logits=None, head_mlp=None, noise=None, scale=None):
    """The compiled op of q's device ("cpu" or "cuda" backend) through the public function."""
    return nested_attention(q, k, v, prev_logits, head_mlp=head_mlp, noise=noise, scale=scale,
                            backend=q.device.type)
from helpers.inputs import nested_inputs
from helpers.oracle import assert_2x_pytorch

needs_cpp = pytest.mark.cpp
needs_cuda_build = pytest.mark.cuda_ext

FORMS = ["first", "realformer", "coda"]  # no prev; prev without MLP; prev with MLP


def make(B, H, T, d, dv, form, noise=False, dtype=torch.float64, seed=0, device="cpu", neg_inf=False):
    """(q, k, v, prev, head_mlp, noise) from helpers.inputs: form "first" (no prev_logits),
    "realformer" or "coda"; neg_inf puts one −inf logit in prev_logits."""
    q, k, v, prev, mlp, eps, _, _ = nested_inputs(B, H, T, d, dv, form=form,
                                                  prev=False if form == "first" else ("one" if neg_inf else True),
                                                  noise=noise, dtype=dtype, device=device, seed=seed)
    return q, k, v, prev, None if mlp is None else tuple(mlp), eps


def diff_inputs(q, k, v, prev, mlp):
    return [q, k, v] + ([prev] if prev is not None else []) + (list(mlp) if (mlp is not None and prev is not None) else [])


@needs_cpp
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 3, 2, 3), (1, 3, 4, 3, 2)])
def test_cpu_gradcheck_fp64(form, noise, shape):
    q, k, v, prev, mlp, eps = make(*shape, form, noise=noise, neg_inf=(form != "first"))
    xs = [t.requires_grad_() for t in diff_inputs(q, k, v, prev, mlp)]
    n_prev = 1 if prev is not None else 0

    def f(*ts):
        qq, kk, vv = ts[:3]
        pp = ts[3] if n_prev else None
        mm = tuple(ts[3 + n_prev:]) if mlp is not None and n_prev else mlp
        out, z = nested_attention_compiled(qq, kk, vv, pp, mm, eps, 0.7)
        # both outputs get an upstream gradient; −inf logits are replaced so gradcheck sees finite values
        return out, torch.where(torch.isinf(z), torch.zeros_like(z), z)

    assert torch.autograd.gradcheck(f, xs)


@needs_cpp
@pytest.mark.parametrize("form", FORMS)
def test_cpu_forward_fp64_matches_reference(form):
    q, k, v, prev, mlp, eps = make(3, 4, 9, 6, 5, form, noise=True, neg_inf=True)
    out, z = nested_attention_compiled(q, k, v, prev, mlp, eps, 0.4)
    ref_out, ref_z = nested_attention_ref(q, k, v, prev, mlp, eps, 0.4)
    assert torch.allclose(out, ref_out, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(z), torch.isinf(ref_z))
    fin = torch.isfinite(ref_z)
    assert torch.allclose(z[fin], ref_z[fin], atol=1e-12, rtol=0)
    _, _, lse = torch.ops.tntkernels.nested_attention(q, k, v, prev, list(mlp or ()), eps, 0.4)
    assert torch.allclose(lse, torch.logsumexp(ref_z, -1), atol=1e-12)


@needs_cpp
def test_cpu_gradgradcheck_falls_back_to_reference():
    q, k, v, prev, mlp, _ = make(1, 2, 2, 2, 2, "coda")
    xs = [t.requires_grad_() for t in (q, k, v, prev)]
    f = lambda a, b, c, p: nested_attention_compiled(a, b, c, p, mlp, None, 0.5)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, xs)


@needs_cpp
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(form, dtype):
    q, k, v, prev, mlp, eps = make(2, 3, 5, 6, 4, form, noise=True, dtype=dtype)
    for t in diff_inputs(q, k, v, prev, mlp):
        t.requires_grad_()
    args = (q, k, v, prev, list(mlp or ()), eps, 0.5)
    torch.library.opcheck(torch.ops.tntkernels.nested_attention.default, args)
    out, z, lse = torch.ops.tntkernels.nested_attention(*args)
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    bargs = (torch.randn_like(out), torch.randn_like(z), det(q), det(k), det(v), det(prev),
             [t.detach() for t in (mlp or ())], eps, out.detach(), lse, 0.5)
    torch.library.opcheck(torch.ops.tntkernels.nested_attention_backward.default, bargs)


SHAPES_2X = [  # (B, H, T, d, dv): awkward sizes
    (3, 4, 16, 6, 6),
    (4, 1, 1, 6, 6),
    (2, 3, 9, 10, 7),
    (1, 4, 49, 6, 10),
    (2, 3, 16, 10, 6),
]


def check_2x(shape, form, dtype, floor, device, fn):
    exact_t = make(*shape, form, noise=True, neg_inf=True, device=device)
    q, k, v, prev, mlp, eps = exact_t
    exact_in = [t.requires_grad_() for t in diff_inputs(q, k, v, prev, mlp)]
    low_t = make(*shape, form, noise=True, neg_inf=True, device=device, dtype=dtype)
    ours_t = make(*shape, form, noise=True, neg_inf=True, device=device, dtype=dtype)
    low_in = [t.requires_grad_() for t in diff_inputs(*low_t[:5])]
    ours_in = [t.requires_grad_() for t in diff_inputs(*ours_t[:5])]
    g = torch.Generator().manual_seed(5)
    B, H, T, d, dv = shape
    g_out = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64).to(device)
    g_z = torch.randn(B, H, T, T, generator=g, dtype=torch.float64).to(device)
    scale = d ** -0.5
    exact = nested_attention_ref(*exact_t, scale)
    low = nested_attention_ref(*low_t, scale)
    ours = fn(*ours_t, scale)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    fin = torch.isfinite(exact[1])
    assert torch.equal(torch.isfinite(ours[1]), fin)
    assert_2x_pytorch(ours[0], low[0], exact[0], floor, "out")
    assert_2x_pytorch(ours[1][fin], low[1][fin], exact[1][fin], floor, "logits")
    for res, gg in ((exact, (g_out, g_z)), (low, (g_out.to(dtype), g_z.to(dtype))), (ours, (g_out.to(dtype), g_z.to(dtype)))):
        torch.autograd.backward(list(res), list(gg))
    names = ["dq", "dk", "dv", "dprev", "dw1", "db1", "dw2", "db2", "dw3", "db3"]
    for name, a, b, c in zip(names, ours_in, low_in, exact_in):
        # weight gradients sum B·T² terms: the floor scales with their count
        fl = floor * (B * T * T if name.startswith(("dw", "db")) else 1)
        assert_2x_pytorch(a.grad, b.grad, c.grad, fl, name)


@needs_cpp
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES_2X)
def test_cpu_2x_rule(shape, form, dtype, floor):
    check_2x(shape, form, dtype, floor, "cpu", nested_attention_compiled)


# Around the edges of the two CPU paths (csrc/cpu/nested_attention.cpp): T 16 in float32 with d, dv <= 64
# runs on 16-lane tiles (H 4 with d 6 unrolled, any other H / d at run time); everything else runs the
# general path (own register-tiled GEMMs, the head-MLP on blocks of 16 float / 8 double positions, the
# last block of a row partial).
SHAPES_PATHS = [
    (2, 1, 16, 1, 7),    # tiles, H 1, d 1
    (2, 3, 16, 7, 1),    # tiles, H 3, dv 1
    (2, 5, 16, 6, 6),    # tiles, H 5 (d 6 but not the H 4 unrolled case)
    (1, 4, 16, 65, 6),   # T 16 with d > 64: the general path
    (2, 3, 15, 6, 6),    # one partial block per row
    (2, 4, 17, 6, 6),    # a full block and a one-position block
    (1, 6, 33, 64, 64),  # H 6 unrolled, 3 blocks per row, the GEMMs' two-vector panels
    (1, 2, 40, 3, 20),   # a one-vector GEMM panel after a two-vector one (dv 20 → 32)
]


@needs_cpp
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES_PATHS)
def test_cpu_paths_2x_rule(shape, form, dtype, floor):
    check_2x(shape, form, dtype, floor, "cpu", nested_attention_compiled)


@needs_cpp
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES_PATHS)
def test_cpu_paths_fp64_match_reference(shape, form, noise):
    """float64 (general path, 8-lane blocks) against the reference, forward and every gradient, with
    30% of the previous logits −inf; no grad_logits (the output gradient only)."""
    B, H, T, d, dv = shape
    q, k, v, prev, mlp, eps, g_out, _ = nested_inputs(B, H, T, d, dv, form="coda" if form == "coda" else "realformer",
                                                      prev=False if form == "first" else "mask", noise=noise)
    mlp = tuple(mlp) if mlp is not None else None
    xs = diff_inputs(q, k, v, prev, mlp)
    grads = []
    for fn in (nested_attention_compiled, nested_attention_ref):
        ins = [t.detach().clone().requires_grad_() for t in xs]
        qq, kk, vv = ins[:3]
        pp = ins[3] if prev is not None else None
        mm = tuple(ins[4:]) if mlp is not None and prev is not None else mlp
        out, z = fn(qq, kk, vv, pp, mm, eps, 0.3)
        out.backward(g_out)
        grads.append([out.detach(), z.detach()] + [t.grad for t in ins])
    ours, ref = grads
    for a, b in zip(ours, ref):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin)
        assert torch.allclose(a[fin], b[fin], atol=1e-10, rtol=1e-10)


@needs_cpp
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(300, 4, 16, 6, 6), (21, 3, 16, 7, 5), (5, 6, 33, 64, 64), (3, 2, 17, 6, 6)])
def test_cpu_paths_deterministic_across_thread_counts(shape, form):
    """float32, both paths: 1 and 2 threads give the same bits (fixed chunks of sequences, fixed-order
    sums, weight gradients reduced in chunk order), no noise and no grad_logits this time."""
    B, H, T, d, dv = shape
    q, k, v, prev, mlp, _ = make(B, H, T, d, dv, form, dtype=torch.float32, neg_inf=form != "first")
    g = torch.randn(B, H, T, dv, generator=torch.Generator().manual_seed(3))

    def run():
        xs = [t.detach().clone().requires_grad_() for t in diff_inputs(q, k, v, prev, mlp)]
        pp = xs[3] if prev is not None else None
        mm = tuple(xs[4:]) if mlp is not None and prev is not None else mlp
        out, z = nested_attention_compiled(*xs[:3], pp, mm, None, 0.4)
        out.backward(g)
        return [out.detach(), z.detach()] + [t.grad for t in xs]

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def _all_results(form, dtype, device, B=37):
    q, k, v, prev, mlp, eps = make(B, 4, 16, 6, 6, form, noise=True, dtype=dtype, device=device)
    xs = [t.requires_grad_() for t in diff_inputs(q, k, v, prev, mlp)]
    out, z = nested_attention_compiled(q, k, v, prev, mlp, eps, 0.4)
    grads = torch.autograd.grad((out.float().square().sum() + z.float().sin().sum()), xs)
    return [out.detach(), z.detach(), *grads]


@needs_cpp
@pytest.mark.parametrize("form", ["realformer", "coda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_deterministic_across_thread_counts(form, dtype):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_results(form, dtype, "cpu", B=300)
        torch.set_num_threads(2)
        two = _all_results(form, dtype, "cpu", B=300)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
def test_cpu_empty_batch_and_permuted_views():
    q, k, v, prev, mlp, _ = make(0, 2, 4, 3, 3, "coda")
    out, z = nested_attention_compiled(q, k, v, prev, mlp, None, 0.5)
    assert out.shape == (0, 2, 4, 3) and z.shape == (0, 2, 4, 4)
    q, k, v, prev, mlp, _ = make(2, 3, 5, 4, 4, "coda")
    qp = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qp.is_contiguous()
    a = nested_attention_compiled(qp, k, v, prev.transpose(-1, -2).contiguous().transpose(-1, -2), mlp, None, 0.5)
    b = nested_attention_ref(q, k, v, prev, mlp, None, 0.5)
    assert torch.allclose(a[0], b[0], atol=1e-12) and torch.allclose(a[1], b[1], atol=1e-12)


@needs_cpp
def test_compiled_op_traces_under_torch_compile():
    q, k, v, prev, mlp, _ = make(2, 2, 5, 4, 4, "coda", dtype=torch.float32)
    f = torch.compile(lambda *a: nested_attention_compiled(*a)[0] * 2, fullgraph=True, backend="eager")
    ref = nested_attention_ref(q, k, v, prev, mlp, None, 0.5)[0]
    assert torch.allclose(f(q, k, v, prev, mlp, None, 0.5), 2 * ref, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("change,match", [
    (dict(k=torch.randn(2, 3, 5, 3)), r"k must have q's shape"),
    (dict(q=torch.randn(3, 5, 4)), r"q must be 4-D"),
    (dict(v=torch.randn(2, 3, 4, 4)), r"v must have shape \(B, H, T, dv\)"),
    (dict(prev=torch.randn(2, 3, 5, 4)), r"prev_logits must have shape \(B, H, T, T\)"),
    (dict(noise=torch.randn(2, 3, 5, 5, dtype=torch.float64)), r"noise has dtype Double but q has Float"),
    (dict(mlp_bad=0), r"head_mlp must be empty or 6 tensors"),
    (dict(mlp_shape=0), r"head_mlp.w2 must have shape"),
    (dict(q=torch.randint(0, 3, (2, 3, 5, 4))), r"q must be float16, bfloat16, float32 or float64"),
])
def test_bad_inputs(change, match):
    a = dict(q=torch.randn(2, 3, 5, 4), k=torch.randn(2, 3, 5, 4), v=torch.randn(2, 3, 5, 4),
             prev=torch.randn(2, 3, 5, 5), noise=None)
    mlp = [t.float() for t in make(2, 3, 5, 4, 4, "coda")[4]]
    if "mlp_bad" in change:
        mlp = mlp[:5]
    elif "mlp_shape" in change:
        mlp[2] = torch.randn(12, 11)
    else:
        a.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tntkernels.nested_attention(a["q"], a["k"], a["v"], a["prev"], mlp, a["noise"], 0.5)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
def test_cuda_rejects_unsupported_sizes():
    q = torch.randn(2, 2, 65, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"supports T <= 64 tokens, H <= 16 heads"):
        torch.ops.tntkernels.nested_attention(q, q, q, None, [], None, 0.5)
    q = torch.randn(2, 2, 8, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"supports float32, float16 and bfloat16"):
        torch.ops.tntkernels.nested_attention(q, q, q, None, [], None, 0.5)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES_2X + [(2, 16, 64, 64, 64), (3, 16, 33, 8, 64)])
def test_cuda_2x_rule(shape, form, dtype, floor):
    check_2x(shape, form, dtype, floor, "cuda", nested_attention_compiled)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", FORMS)
def test_cuda_tnt_s_inner_shape_large_batch(form, dtype, floor):
    B = 400 * 196  # > 65,535 sequences on grid axis x
    q, k, v, prev, mlp, eps = make(B, 4, 16, 6, 6, form, noise=True, dtype=dtype, device="cuda")
    out, z = nested_attention_compiled(q, k, v, prev, mlp, eps, 6 ** -0.5)
    q64, k64, v64, p64, m64, e64 = make(B, 4, 16, 6, 6, form, noise=True, device="cuda")
    ref_out, ref_z = nested_attention_ref(q64, k64, v64, p64, m64, e64, 6 ** -0.5)
    low_out, low_z = nested_attention_ref(q, k, v, prev, mlp, eps, 6 ** -0.5)
    assert_2x_pytorch(out, low_out, ref_out, floor, "out")
    assert_2x_pytorch(z, low_z, ref_z, floor, "logits")
    # the last sequences are right (walks past the grid cap / 65,535)
    tail = nested_attention_ref(*(t[-3:].double() if t is not None else None for t in (q, k, v, prev)),
                                None if mlp is None else tuple(t.double() for t in mlp),
                                eps[-3:].double(), 6 ** -0.5)
    assert torch.allclose(out[-3:].double(), tail[0], atol=50 * floor)


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_deterministic(form, dtype):
    one = _all_results(form, dtype, "cuda", B=70_000)
    two = _all_results(form, dtype, "cuda", B=70_000)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_cuda_matches_cpu_op_fp32(form):
    q, k, v, prev, mlp, eps = make(5, 3, 9, 6, 5, form, noise=True, dtype=torch.float32)
    cpu = _all_on(q, k, v, prev, mlp, eps)
    to = lambda t: None if t is None else t.cuda()  # noqa: E731
    gpu = _all_on(to(q), to(k), to(v), to(prev), None if mlp is None else tuple(t.cuda() for t in mlp), to(eps))
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-4, rtol=1e-4)


def _all_on(q, k, v, prev, mlp, eps):
    xs = [t.detach().clone().requires_grad_() for t in diff_inputs(q, k, v, prev, mlp)]
    n_prev = 1 if prev is not None else 0
    pp = xs[3] if n_prev else None
    mm = tuple(xs[3 + n_prev:]) if (mlp is not None and n_prev) else mlp
    out, z = nested_attention_compiled(xs[0], xs[1], xs[2], pp, mm, eps, 0.4)
    grads = torch.autograd.grad(out.square().sum() + z.sin().sum(), xs)
    return [out.detach(), z.detach(), *grads]


@needs_cpp
@needs_cuda_build
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(11, 4, 16, 6, 6), (7, 6, 33, 16, 16)])
def test_cuda_grid_stride_loops(grid_cap_3, shape, form, dtype, floor):
    """11 or 7 sequences on 3 blocks: each block walks several (forward, backward, partial reduction)."""
    check_2x(shape, form, dtype, floor, "cuda", nested_attention_compiled)


@needs_cpp
def test_backend_none_on_cpu_follows_the_measured_rule(monkeypatch):
    """registry._nested_auto_cpu: the C++ op at T 16 (tile path) and with the head-MLP up to T 256, in
    float32 with head dims <= 64; the reference elsewhere (RealFormer at T != 16, other dtypes)."""
    from tntkernels.ops import registry

    monkeypatch.delenv("TNTKERNELS_BACKEND", raising=False)

    def pick(T, d, use_mlp, dtype=torch.float32):
        q = torch.zeros(1, 2, T, d, dtype=dtype)
        return registry.resolve("nested_attention", None, q.device, q, q, use_mlp)

    assert pick(16, 6, False) == "cpu" and pick(16, 64, True) == "cpu"
    assert pick(197, 64, True) == "cpu" and pick(256, 8, True) == "cpu"
    assert pick(197, 64, False) == "reference" and pick(17, 6, False) == "reference"
    assert pick(257, 8, True) == "reference" and pick(16, 65, False) == "reference"
    assert pick(16, 6, False, torch.float64) == "reference" and pick(16, 6, True, torch.bfloat16) == "reference"

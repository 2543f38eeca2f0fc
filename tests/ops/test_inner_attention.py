"""inner_attention: the reference against independent formulations, and the compiled op against it."""
import sys

import pytest
import torch
import torch.nn.functional as F

from tntkernels import _backend, inner_attention, inner_attention_ref
from tntkernels.ops import registry
from helpers.inputs import attention_inputs
from helpers.oracle import check_2x_rule

needs_cpp = pytest.mark.cpp

SHAPES = [  # (S, H, m, d, dv): awkward word counts and TNT head dims
    (3, 4, 16, 6, 6),   # TNT-S inner
    (2, 4, 16, 10, 10),  # TNT-B inner
    (5, 1, 1, 6, 6),    # one word
    (2, 2, 9, 6, 12),   # dv != d
    (1, 3, 49, 10, 10),
    (2, 2, 17, 64, 64),
    (2, 3, 16, 8, 4),   # m 16, other head dims: the C++ fast path with runtime d, dv
    (1, 2, 16, 64, 33),  # ... at its widest
    (1, 1, 16, 70, 3),  # m 16 past the fast path's head_dim 64: the general C++ path
]


def make(S, H, m, d, dv, dtype=torch.float64, requires_grad=False, seed=0):
    """Contiguous q, k, v (helpers.inputs), leaves."""
    q, k, v, _ = attention_inputs(S, H, m, d, dv, dtype=dtype, seed=seed)
    return [t.clone().requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_sdpa_math_and_loops(shape):
    q, k, v = make(*shape)
    out = inner_attention_ref(q, k, v)
    # independent formulation 1: PyTorch's SDPA (math path on CPU in float64)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12)
    # independent formulation 2: explicit per-row softmax with Python loops over one pair
    S, H, m, d, dv = shape
    s, h = S - 1, H - 1
    for i in range(m):
        logits = torch.tensor([float(q[s, h, i] @ k[s, h, j]) * d ** -0.5 for j in range(m)], dtype=torch.float64)
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        assert torch.allclose(out[s, h, i], (w[:, None] * v[s, h]).sum(0), atol=1e-12)


def test_reference_matches_timm_attention():
    timm_tnt = pytest.importorskip("timm.models.tnt")
    torch.manual_seed(0)
    attn = timm_tnt.Attention(24, 24, num_heads=4).double().eval()
    x = torch.randn(6, 16, 24, dtype=torch.float64)
    B, N, C = x.shape
    qk = attn.qk(x).reshape(B, N, 2, 4, 6).permute(2, 0, 3, 1, 4)
    v = attn.v(x).reshape(B, N, 4, -1).permute(0, 2, 1, 3)
    ours = attn.proj(inner_attention_ref(qk[0], qk[1], v).transpose(1, 2).reshape(B, N, C))
    assert torch.allclose(ours, attn(x), atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_op_forward_fp64(shape):
    q, k, v = make(*shape)
    out = inner_attention(q, k, v, backend="cpu")
    assert torch.allclose(out, inner_attention_ref(q, k, v), atol=1e-12, rtol=0)
    out2, lse = torch.ops.tntkernels.inner_attention(q, k, v, shape[3] ** -0.5)
    logits = (q @ k.transpose(-2, -1)) * shape[3] ** -0.5
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-12)
    assert torch.equal(out, out2)


@needs_cpp
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[-3:])  # SHAPES[-3:]: the m 16 fast path's other head dims
def test_cpu_op_forward_and_grads_2x_rule(shape, dtype, floor):
    q, k, v = (t.to(dtype).requires_grad_() for t in make(*shape))
    g = torch.randn(*shape[:3], shape[4], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    assert inner_attention(q, k, v, backend="cpu").dtype == dtype
    check_2x_rule(lambda *a: inner_attention(*a, backend="cpu"), inner_attention_ref, [q, k, v], [g], floor,
                  names=("out", "dq", "dk", "dv"))


@needs_cpp
@pytest.mark.parametrize("shape", [(2, 2, 5, 3, 4), (1, 1, 1, 2, 2), (2, 1, 9, 6, 6), (1, 2, 3, 2, 2)])
def test_cpu_op_gradcheck_fp64(shape):
    q, k, v = make(*shape, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: inner_attention(a, b, c, backend="cpu"), (q, k, v))
    if q.numel() <= 16:  # double backward (create_graph=True) differentiates the reference formula
        assert torch.autograd.gradgradcheck(lambda a, b, c: inner_attention(a, b, c, backend="cpu"), (q, k, v))


@needs_cpp
def test_cpu_op_accepts_permuted_views():
    x = torch.randn(2 * 3, 16, 2, 4, 6, dtype=torch.float64)  # (B, N, 2, H, hd) like the qk Linear output
    q, k = x.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd), non-contiguous
    v = torch.randn(6, 16, 4, 6, dtype=torch.float64).permute(0, 2, 1, 3)
    assert not q.is_contiguous()
    assert torch.allclose(inner_attention(q, k, v, backend="cpu"), inner_attention_ref(q, k, v), atol=1e-12)


@needs_cpp
def test_cpu_op_empty_and_deterministic():
    q, k, v = make(0, 4, 16, 6, 6)
    assert inner_attention(q, k, v, backend="cpu").shape == (0, 4, 16, 6)
    q, k, v = make(64, 4, 16, 6, 6, dtype=torch.float32, requires_grad=True)
    outs = []
    for _ in range(2):
        out = inner_attention(q, k, v, backend="cpu")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        outs.append((out.detach(), *grads))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    q, k, v = make(3, 2, 9, 6, 5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.tntkernels.inner_attention.default, (q, k, v, 6 ** -0.5))
    out, lse = torch.ops.tntkernels.inner_attention(q, k, v, 6 ** -0.5)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.tntkernels.inner_attention_backward.default,
                          (g, q.detach(), k.detach(), v.detach(), out.detach(), lse, 6 ** -0.5))


@needs_cpp
def test_compiled_op_traces_under_torch_compile():
    q, k, v = make(4, 2, 16, 6, 6, dtype=torch.float32)
    f = torch.compile(lambda a, b, c: inner_attention(a, b, c, backend="cpu") * 2, fullgraph=True, backend="eager")
    assert torch.allclose(f(q, k, v), 2 * inner_attention_ref(q, k, v), atol=1e-6)


@needs_cpp
def test_default_backend_on_cpu_is_the_cpp_op(monkeypatch):
    monkeypatch.delenv("TNTKERNELS_BACKEND", raising=False)
    impls = registry.OPS["inner_attention"].implementations
    calls, compiled = [], impls["cpu"]
    monkeypatch.setitem(impls, "cpu", lambda *a: calls.append("cpu") or compiled(*a))
    q, k, v = make(2, 2, 4, 6, 6)
    inner_attention(q, k, v)
    assert calls == ["cpu"]
    inner_attention(*make(2, 2, 4, 32, 32))  # wide heads: the reference's batched GEMMs
    assert calls == ["cpu"]
    monkeypatch.setenv("TNTKERNELS_BACKEND", "reference")
    inner_attention(q, k, v)
    assert calls == ["cpu"]


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(q=torch.randn(2, 16, 6)), ValueError, r"q must be 4-D \(S, H, m, d\)"),
    (dict(k=torch.randn(2, 4, 16, 7)), ValueError, r"k must have q's shape"),
    (dict(v=torch.randn(2, 4, 15, 6)), ValueError, r"v must have shape \(S, H, m, dv\)"),
    (dict(k=torch.randn(2, 4, 16, 6, dtype=torch.float64)), ValueError, r"k has dtype torch.float64 but q has torch.float32"),
    (dict(q=torch.randint(0, 3, (2, 4, 16, 6))), ValueError, r"q must be float16, bfloat16, float32 or float64"),
    (dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float"),
    (dict(backend="numpy"), ValueError, r"unknown backend 'numpy'"),
    (dict(backend="cuda"), RuntimeError, r"backend 'cuda' is not available"),
    (dict(backend="triton"), RuntimeError, r"backend 'triton' is not available"),
])
def test_bad_inputs(kwargs, err, match):
    args = dict(q=torch.randn(2, 4, 16, 6), k=torch.randn(2, 4, 16, 6), v=torch.randn(2, 4, 16, 6))
    args.update(kwargs)
    scale = args.pop("scale", None)
    backend = args.pop("backend", None)
    with pytest.raises(err, match=match):
        inner_attention(args["q"], args["k"], args["v"], scale=scale, backend=backend)


@needs_cpp
def test_compiled_op_checks_inputs_directly():
    q = torch.randn(2, 4, 16, 6)
    with pytest.raises(RuntimeError, match=r"k must have q's shape"):
        torch.ops.tntkernels.inner_attention(q, torch.randn(2, 4, 16, 5), q, 1.0)
    with pytest.raises(RuntimeError, match=r"q must be 4-D"):
        torch.ops.tntkernels.inner_attention(q[0], q[0], q[0], 1.0)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
# the CUDA kernels' domain: m, d, dv <= 64 (the head_dim 70 shape is the CPU general path's)
@pytest.mark.parametrize("shape", [s for s in SHAPES if max(s[2:]) <= 64] + [(70_000, 1, 16, 6, 6)])
def test_cuda_op_2x_rule(shape, dtype, floor):
    q, k, v, dout = (t.to(dtype) for t in attention_inputs(*shape, dtype=torch.float64, device="cuda"))
    check_2x_rule(lambda *a: inner_attention(*a, backend="cuda"), inner_attention_ref,
                  [t.requires_grad_() for t in (q, k, v)], [dout], floor, names=("out", "dq", "dk", "dv"))

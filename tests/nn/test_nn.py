"""Drop-in modules against timm's: same parameter names, same outputs and gradients (fp32, CPU)."""
import subprocess
import sys

import pytest
import torch

from tntkernels import _backend
from tntkernels.nn import Attention, TNTBlock

timm_tnt = pytest.importorskip("timm.models.tnt")
BACKENDS = ["reference"] + (["cpu"] if _backend.cpp_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim,heads,hidden", [(24, 4, 24), (40, 4, 40), (384, 6, 384), (24, 4, 16)])
def test_attention_matches_timm(dim, heads, hidden, backend):
    torch.manual_seed(0)
    theirs = timm_tnt.Attention(dim, hidden, num_heads=heads)
    ours = Attention(dim, hidden, num_heads=heads, backend=backend)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(5, 16, dim)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(x1), theirs(x2)
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=2e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy", [False, True])
def test_tnt_block_matches_timm(backend, legacy):
    torch.manual_seed(0)
    kw = dict(dim=24, dim_out=96, num_pixel=16, num_heads_in=4, num_heads_out=4, legacy=legacy)
    theirs = timm_tnt.Block(**kw)
    ours = TNTBlock(**kw, backend=backend)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    B, N = 3, 4
    pix, pat = torch.randn(B * N, 16, 24), torch.randn(B, N + 1, 96)
    (pa, qa), (pb, qb) = ours(pix, pat), theirs(pix, pat)
    assert torch.allclose(pa, pb, atol=2e-5, rtol=1e-4)
    assert torch.allclose(qa, qb, atol=2e-5, rtol=1e-4)
    (pa.square().sum() + qa.square().sum()).backward()
    (pb.square().sum() + qb.square().sum()).backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-3, rtol=1e-3), name


def test_attention_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(24, 24, num_heads=5)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 24\)"):
        Attention(24, 24, num_heads=4)(torch.randn(2, 16, 23))


def test_module_compiles_fullgraph():
    attn = Attention(24, 24, num_heads=4)
    x = torch.randn(4, 16, 24)
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), attn(x), atol=1e-6)


def test_python_m_tntkernels_reports_backends():
    out = subprocess.run([sys.executable, "-m", "tntkernels"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("tntkernels 0.1.0")
    for name in ("C++ CPU", "CUDA C++", "Triton", "inner_attention"):
        assert name in out
    expect = "C++ CPU   : available" if _backend.cpp_available() else "C++ CPU   : unavailable"
    assert expect in out


def test_attention_route():
    """Long sequences and shapes the named kernel does not cover go to SDPA; the rest to the kernel."""
    from tntkernels.nn.attention import MAX_KERNEL_TOKENS, attention_route

    short, long = torch.zeros(2, 4, 16, 6), torch.zeros(2, 6, MAX_KERNEL_TOKENS + 133, 64)
    assert attention_route("reference", long, long) == "reference"
    for backend in (None, "cpu", "cuda", "triton"):
        assert attention_route(backend, long, long) == "sdpa"
    assert attention_route(None, short, short) is None
    assert attention_route("cpu", short, short) == "cpu"
    assert attention_route("triton", short, short) == "triton"
    assert attention_route("triton", short.double(), short.double()) == "sdpa"  # no float64 Triton kernel
    wide = torch.zeros(2, 1, 16, 96)
    assert attention_route("cuda", wide, wide) == "sdpa"  # the CUDA kernel stops at head_dim 64
    assert attention_route("triton", wide, wide) == "sdpa"


@pytest.mark.parametrize("backend", BACKENDS)
def test_outer_attention_197_tokens_matches_timm(backend):
    """TNT-S's outer attention (197 tokens, 6 heads of 64) runs on every backend via SDPA."""
    torch.manual_seed(0)
    theirs = timm_tnt.Attention(384, 384, num_heads=6)
    ours = Attention(384, 384, num_heads=6, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 197, 384)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(x1), theirs(x2)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_nested_route(monkeypatch):
    """NestedAttention: a shape the named kernel does not cover falls back to Triton, else the reference."""
    from tntkernels.nn import nested_attention as mod

    outer, huge = torch.zeros(2, 6, 197, 64), torch.zeros(1, 2, 2000, 8)
    inner = torch.zeros(2, 4, 16, 6)
    assert mod.nested_route(None, outer, outer) is None
    assert mod.nested_route("reference", outer, outer) == "reference"
    with pytest.raises(RuntimeError, match="not available"):  # a device the backend cannot run on is not rerouted
        mod.nested_attention(outer, outer, outer, backend=mod.nested_route("cuda", outer, outer))
    monkeypatch.setattr(mod._backend, "why_unavailable", lambda backend, device: None)  # as if on a GPU
    assert mod.nested_route("cuda", inner, inner) == "cuda"
    assert mod.nested_route("cuda", outer, outer) == "triton"  # the CUDA C++ kernels stop at 64 tokens
    assert mod.nested_route("cuda", huge, huge) == "reference"  # beyond the Triton kernels' 1024 tokens
    assert mod.nested_route("triton", huge, huge) == "reference"
    assert mod.nested_route("triton", outer, outer) == "triton"

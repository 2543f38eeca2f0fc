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

"""hsim_split_linear: the reference against the dense-matrix oracle of TinT's H_sim-split op."""
import pytest
import torch

from tntkernels import hsim_split_linear, hsim_split_linear_ref

from helpers.inputs import hsim_inputs


def params(H=4, d=8, seed=0):
    """(M, m, A, a) in float64, from helpers.inputs."""
    return hsim_inputs((1,), H, d, seed=seed)[1]


def dense_oracle(M, m, A, a):
    """W_dense[(h,k),(g,j)] = M[k,h,g] · A[g][k,j]; bias = Σ_k m[k,g] A[g][k,j] + a[g,j] (docs/tint.md §1)."""
    d, H, _ = M.shape
    W = torch.zeros(H * d, H * d, dtype=M.dtype)
    bias = torch.zeros(H * d, dtype=M.dtype)
    for h in range(H):
        for k in range(d):
            for g in range(H):
                for j in range(d):
                    W[h * d + k, g * d + j] = M[k, h, g] * A[g, k, j]
    for g in range(H):
        for j in range(d):
            bias[g * d + j] = sum(m[k, g] * A[g, k, j] for k in range(d)) + a[g, j]
    return W, bias


@pytest.mark.parametrize("H,d", [(4, 8), (3, 5), (1, 6)])
def test_composite_matches_dense_oracle(H, d):
    M, m, A, a = params(H, d)
    x = torch.randn(7, 3, H * d, dtype=torch.float64)
    W, bias = dense_oracle(M, m, A, a)
    assert torch.allclose(hsim_split_linear_ref(x, M, m, A, a), x @ W + bias, atol=1e-12)
    assert torch.allclose(hsim_split_linear(x, M, m, A, a), x @ W + bias, atol=1e-12)


def test_parts_alone_match_loops():
    H, d = 3, 4
    M, m, A, a = params(H, d)
    x = torch.randn(5, H * d, dtype=torch.float64)
    xs = x.reshape(5, H, d)
    z = torch.zeros(5, H, d, dtype=torch.float64)
    for g in range(H):
        for k in range(d):
            z[:, g, k] = sum(xs[:, h, k] * M[k, h, g] for h in range(H)) + m[k, g]
    assert torch.allclose(hsim_split_linear(x, M, m), z.reshape(5, -1), atol=1e-12)
    y = torch.stack([xs[:, g] @ A[g] + a[g] for g in range(H)], 1)  # TinT's per-head loop form
    assert torch.allclose(hsim_split_linear(x, block_weight=A, block_bias=a), y.reshape(5, -1), atol=1e-12)
    assert torch.allclose(hsim_split_linear(x, block_weight=A), (y - a).reshape(5, -1), atol=1e-12)


def test_gradients_match_spec_formulas():
    H, d, N = 3, 4, 6
    M, m, A, a = (t.requires_grad_() for t in params(H, d))
    x = torch.randn(N, H * d, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(N, H, d, dtype=torch.float64)
    hsim_split_linear(x, M, m, A, a).backward(dy.reshape(N, -1))
    xs = x.detach().reshape(N, H, d)
    z = torch.einsum("nhk,khg->ngk", xs, M.detach()) + m.detach().t()
    dz = torch.einsum("ngj,gkj->ngk", dy, A.detach())  # dz = dy · A[g]ᵀ
    assert torch.allclose(x.grad.reshape(N, H, d), torch.einsum("ngk,khg->nhk", dz, M.detach()), atol=1e-12)
    assert torch.allclose(A.grad, torch.einsum("ngk,ngj->gkj", z, dy), atol=1e-12)
    assert torch.allclose(a.grad, dy.sum(0), atol=1e-12)
    assert torch.allclose(M.grad, torch.einsum("nhk,ngk->khg", xs, dz), atol=1e-12)
    assert torch.allclose(m.grad, dz.sum(0).t(), atol=1e-12)


@pytest.mark.parametrize("args,match", [
    (dict(mix_bias=torch.randn(8, 4)), r"mix_bias given without mix_weight"),
    (dict(block_weight=torch.randn(4, 8, 7)), r"block_weight must have shape \(H, d, d\)"),
    (dict(block_weight=torch.randn(5, 8, 8)), r"x's last dim D=32 must equal H·d"),
    (dict(mix_weight=torch.randn(8, 4, 4, dtype=torch.float64)), r"mix_weight has dtype"),
    (dict(mix_weight=torch.randn(8, 4)), r"mix_weight must be 3-D"),
    (dict(block_weight=torch.randn(4, 8, 8), backend="cuda"), r"backend 'cuda' is not (implemented|available)"),
])
def test_bad_inputs(args, match):
    x = torch.randn(3, 32)
    with pytest.raises((ValueError, RuntimeError), match=match):
        hsim_split_linear(x, **args)


# ---------------------------------------------------------------------------------------------
# tntkernels.nn.HsimSplitLinear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parts", ["mix+block", "mix", "block"])
@pytest.mark.parametrize("bias", [True, False])
def test_module_to_dense_is_equivalent(parts, bias):
    from tntkernels.nn import HsimSplitLinear

    torch.manual_seed(0)
    layer = HsimSplitLinear(24, 4, bias=bias, parts=parts).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Linear) and dense.weight.shape == (24, 24)
    assert torch.allclose(layer(x), dense(x), atol=1e-12)
    names = {"mix+block": {"mix_weight", "block_weight"}, "mix": {"mix_weight"}, "block": {"block_weight"}}[parts]
    if bias:
        names |= {n.replace("weight", "bias") for n in names}
    assert set(dict(layer.named_parameters())) == names


def test_module_parameter_count_is_tints():
    """D²/H + D·H weights (mix + block, no biases): 823,296 for D 3072, H 12 (docs/tint.md §1)."""
    from tntkernels.nn import HsimSplitLinear

    layer = HsimSplitLinear(3072, 12, bias=False, device="meta")
    assert sum(p.numel() for p in layer.parameters()) == 3072 ** 2 // 12 + 3072 * 12 == 823_296


def test_module_from_linear_round_trip_and_strict():
    from tntkernels.nn import HsimSplitLinear

    torch.manual_seed(0)
    H, d = 3, 4
    blockdiag = torch.block_diag(*[torch.randn(d, d, dtype=torch.float64) for _ in range(H)])
    linear = torch.nn.Linear(H * d, H * d).double()
    with torch.no_grad():
        linear.weight.copy_(blockdiag)
    layer = HsimSplitLinear.from_linear(linear, H)
    x = torch.randn(7, H * d, dtype=torch.float64)
    assert torch.allclose(layer(x), linear(x), atol=1e-12)
    assert torch.allclose(layer.to_dense().weight, linear.weight, atol=1e-12)
    dense = torch.nn.Linear(H * d, H * d).double()
    with pytest.raises(ValueError, match="not block-diagonal"):
        HsimSplitLinear.from_linear(dense, H)
    kept = HsimSplitLinear.from_linear(dense, H, strict=False)
    assert torch.allclose(kept.to_dense().weight, dense.weight * torch.block_diag(*[torch.ones(d, d)] * H).double())
    with pytest.raises(ValueError, match="square"):
        HsimSplitLinear.from_linear(torch.nn.Linear(12, 8), 3)


def test_module_bad_arguments():
    from tntkernels.nn import HsimSplitLinear

    with pytest.raises(ValueError, match="multiple of num_heads"):
        HsimSplitLinear(10, 3)
    with pytest.raises(ValueError, match="parts must be one of"):
        HsimSplitLinear(12, 3, parts="dense")
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 12\)"):
        HsimSplitLinear(12, 3)(torch.randn(2, 10))

"""nested_attention: the reference against independent formulations (loops over heads, SDPA)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tntkernels import nested_attention, nested_attention_ref
from tntkernels.ops import head_mlp_ref

from helpers.inputs import nested_inputs


def make(B=2, H=4, T=9, d=6, dv=6, seed=0, dtype=torch.float64):
    """q, k, v, prev_logits from helpers.inputs."""
    return nested_inputs(B, H, T, d, dv, form="realformer", dtype=dtype, seed=seed)[:4]


def coda_mlp(H, seed=0, dtype=torch.float64):
    """CODA's head-MLP as three nn.Linear layers, xavier_uniform(gain 1/√2) weights, random biases."""
    torch.manual_seed(seed)
    layers = [nn.Linear(H, 4 * H), nn.Linear(4 * H, 4 * H), nn.Linear(4 * H, H)]
    for lin in layers:
        nn.init.xavier_uniform_(lin.weight, gain=2 ** -0.5)
        nn.init.normal_(lin.bias, std=0.1)
    return [lin.to(dtype) for lin in layers]


def test_first_layer_is_plain_attention():
    q, k, v, _ = make()
    out, logits = nested_attention_ref(q, k, v)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12)
    assert torch.allclose(logits, q @ k.transpose(-2, -1) / 6 ** 0.5, atol=1e-12)


def test_realformer_equals_sdpa_with_additive_mask():
    q, k, v, prev = make(T=17)
    out, logits = nested_attention_ref(q, k, v, prev_logits=prev)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=prev), atol=1e-12)
    assert torch.allclose(logits, q @ k.transpose(-2, -1) * 6 ** -0.5 + prev, atol=1e-12)


def test_coda_matches_per_position_loop_over_heads():
    q, k, v, prev = make(B=1, H=3, T=5)
    l1, l2, l3 = coda_mlp(3)
    mlp = (l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias)
    noise = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    out, logits = nested_attention_ref(q, k, v, prev_logits=prev, head_mlp=mlp, noise=noise, scale=0.3)
    # independent: one (i, j) position at a time, the head vector through three nn.Linear layers
    s = q @ k.transpose(-2, -1) * 0.3 + prev
    expect = torch.empty_like(s)
    for i in range(5):
        for j in range(5):
            h = s[0, :, i, j]
            expect[0, :, i, j] = h + l3(F.leaky_relu(l2(F.leaky_relu(l1(h), 0.2)), 0.2))
    expect = expect + noise
    assert torch.allclose(logits, expect, atol=1e-12)
    p = torch.exp(expect - expect.amax(-1, keepdim=True))
    assert torch.allclose(out, (p / p.sum(-1, keepdim=True)) @ v, atol=1e-12)


def test_masked_logits_stay_masked_and_enter_mlp_as_zero():
    q, k, v, prev = make(B=1, H=2, T=4)
    prev[..., 0, 3] = float("-inf")
    l1, l2, l3 = coda_mlp(2)
    mlp = (l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias)
    out, logits = nested_attention_ref(q, k, v, prev_logits=prev, head_mlp=mlp)
    assert torch.isneginf(logits[..., 0, 3]).all()
    assert torch.isfinite(out).all()
    s = q @ k.transpose(-2, -1) * 6 ** -0.5 + prev
    zeroed = s.clone()
    zeroed[..., 0, 3] = 0
    assert torch.allclose(head_mlp_ref(s, mlp), head_mlp_ref(zeroed, mlp), atol=0)


def test_gradients_flow_to_every_input():
    q, k, v, prev = (t.requires_grad_() for t in make(B=1, H=2, T=3, d=2, dv=2))
    l1, l2, l3 = coda_mlp(2)
    mlp = [t.detach().clone().requires_grad_() for t in (l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias)]
    assert torch.autograd.gradcheck(
        lambda *a: nested_attention_ref(*a[:4], head_mlp=a[4:]), (q, k, v, prev, *mlp))


def test_twelve_layer_stack_carries_logits():
    q, k, v, _ = make(B=1, H=2, T=6)
    logits, outs = None, []
    for layer in range(12):
        out, logits = nested_attention(q * (1 + 0.1 * layer), k, v, logits)
        outs.append(out)
    # RealFormer: Z_12 is the sum of every layer's scaled raw logits
    expect = sum((q * (1 + 0.1 * layer)) @ k.transpose(-2, -1) * 6 ** -0.5 for layer in range(12))
    assert torch.allclose(logits, expect, atol=1e-10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prev_logits=torch.randn(2, 4, 9, 8)), r"prev_logits must have shape \(B, H, T, T\)"),
    (dict(noise=torch.randn(2, 4, 9)), r"noise must be 4-D"),
    (dict(head_mlp=(torch.randn(16, 4),) * 5), r"head_mlp must be 6 tensors"),
    (dict(head_mlp=(torch.randn(16, 3), torch.randn(16), torch.randn(16, 16), torch.randn(16),
                    torch.randn(4, 16), torch.randn(4))), r"head_mlp.w1 must have shape \(4H, H\)"),
    (dict(prev_logits=torch.randn(2, 4, 9, 9, dtype=torch.float64)), r"prev_logits has dtype"),
    (dict(backend="cuda"), r"backend 'cuda' is not available"),
])
def test_bad_inputs(kwargs, match):
    q, k, v = (torch.randn(2, 4, 9, 6) for _ in range(3))
    prev = kwargs.pop("prev_logits", None)
    with pytest.raises((ValueError, RuntimeError), match=match):
        nested_attention(q, k, v, prev, **kwargs)

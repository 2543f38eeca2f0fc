"""NestedAttention, NestedTNTBlock and the Nested-TNT model: logit chains, noise, switches, parameters."""
import pytest
import torch
import torch.nn.functional as F

from tntkernels import _backend
from tntkernels.models import NestedTNT, create_model
from tntkernels.nn import NestedAttention, NestedTNTBlock, TNTBlock
from tntkernels import nested_attention_ref

STACK_BACKENDS = ["reference"] + (["cpu"] if _backend.cpp_available() and hasattr(
    torch.ops.tntkernels, "nested_attention") else [])


def _stack(depth, C, H, head_mlp, seed=0, dtype=torch.float64, backend=None):
    torch.manual_seed(seed)
    layers = [NestedAttention(C, C, num_heads=H, head_mlp=head_mlp, backend=backend).to(dtype) for _ in range(depth)]
    with torch.no_grad():
        for layer in layers:
            if layer.head_mlp is not None:
                for fc in (layer.head_mlp.fc1, layer.head_mlp.fc2, layer.head_mlp.fc3):
                    fc.bias.normal_(0, 0.1)
    return layers


def _manual(layers, x):
    """The same stack written out with the reference op and plain tensor algebra."""
    logits = None
    B, N, C = x.shape
    for layer in layers:
        H, hd = layer.num_heads, layer.head_dim
        q, k = F.linear(x, layer.qk.weight).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4)
        v = F.linear(x, layer.v.weight).reshape(B, N, H, -1).transpose(1, 2)
        mlp = layer.head_mlp.tensors() if layer.head_mlp is not None else None
        out, logits = nested_attention_ref(q, k, v, logits, mlp, None, hd ** -0.5)
        x = x + F.linear(out.transpose(1, 2).reshape(B, N, C), layer.proj.weight, layer.proj.bias)
    return x, logits


@pytest.mark.parametrize("backend", STACK_BACKENDS)
@pytest.mark.parametrize("head_mlp", [True, False], ids=["coda", "realformer"])
def test_twelve_layer_stack_carries_logits_and_matches_reference(head_mlp, backend):
    layers = _stack(12, 24, 4, head_mlp, backend=backend)
    for layer in layers:
        layer.eval()
    x0 = torch.randn(3, 16, 24, dtype=torch.float64)
    x, logits = x0, None
    seen = []
    for layer in layers:
        a, logits = layer(x, logits)
        seen.append(logits)
        x = x + a
    expect_x, expect_logits = _manual(layers, x0)
    assert torch.allclose(x, expect_x, atol=1e-10) and torch.allclose(logits, expect_logits, atol=1e-10)
    # the chain is real: the last layer's logits depend on the first layer's q/k weights
    (g,) = torch.autograd.grad(seen[-1].square().sum(), layers[0].qk.weight)
    assert g.abs().max() > 0
    assert all(s.shape == (3, 4, 16, 16) for s in seen)


def test_noise_in_train_only_and_seeded():
    layer = NestedAttention(24, 24, num_heads=4)
    x = torch.randn(2, 16, 24)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)[1]
    torch.manual_seed(1)
    b = layer(x)[1]
    assert torch.equal(a, b)  # seeded by torch's generator
    layer.eval()
    c = layer(x)[1]
    assert not torch.allclose(a, c) and torch.equal(c, layer(x)[1])
    assert (a - c).std() > 0.5  # ε ~ N(0, 1)


def test_bad_prev_logits_shape():
    layer = NestedAttention(24, 24, num_heads=4)
    with pytest.raises(ValueError, match=r"prev_logits must be \(B, H, N, N\)"):
        layer(torch.randn(2, 16, 24), torch.randn(2, 4, 16, 15))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        NestedAttention(24, 24, num_heads=5)


@pytest.mark.parametrize("nest_inner,nest_outer", [(True, True), (True, False), (False, True)])
def test_block_switches(nest_inner, nest_outer):
    torch.manual_seed(0)
    block = NestedTNTBlock(12, 48, 16, num_heads_in=2, num_heads_out=4, nest_inner=nest_inner,
                           nest_outer=nest_outer).eval()
    words, sentences = torch.randn(2 * 4, 16, 12), torch.randn(2, 5, 48)
    w, s, li, lo = block(words, sentences)
    assert (li is not None) == nest_inner and (lo is not None) == nest_outer
    if nest_inner:
        assert li.shape == (8, 2, 16, 16)
    if nest_outer:
        assert lo.shape == (2, 4, 5, 5)
    # a nested level fed no logits is the plain TNT block with the same weights
    plain = TNTBlock(12, 48, 16, num_heads_in=2, num_heads_out=4).eval()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if "head_mlp" not in k})
    pw, ps = plain(words, sentences)
    assert torch.allclose(w, pw, atol=1e-6) and torch.allclose(s, ps, atol=1e-6)
    # the second block's output changes when it gets the first block's logits
    w2, s2, _, _ = block(w, s, li, lo)
    w3, s3, _, _ = block(w, s)
    assert not torch.allclose(s2, s3)


def test_model_parameters_and_switches():
    """Extra parameters = 24H² + 9H per nested attention of blocks 2..12 (docs/tnt-family.md §3; block 1 has Z = A)."""
    tnt = create_model("tnt_s_patch16_224")
    nested = create_model("nested_tnt_s_patch16_224")
    extra = 11 * ((24 * 16 + 9 * 4) + (24 * 36 + 9 * 6))
    assert sum(p.numel() for p in nested.parameters()) == sum(p.numel() for p in tnt.parameters()) + extra
    inner_only = create_model("nested_tnt_t_patch8_32", nest_outer=False)
    assert all(b.nest_inner and not b.nest_outer for b in inner_only.blocks)
    realformer = create_model("nested_tnt_t_patch8_32", head_mlp=False)
    assert not any("head_mlp" in n for n, _ in realformer.named_parameters())
    with pytest.raises(ValueError, match="nest_inner or nest_outer"):
        NestedTNT(img_size=32, patch_size=8, in_chans=1, nest_inner=False, nest_outer=False)
    # CODA init kept for the head-MLP: zero biases, xavier-scale weights (not TNT's std .02)
    assert nested.blocks[0].attn_in.head_mlp is None and nested.blocks[0].attn_out.head_mlp is None
    mlp = nested.blocks[1].attn_in.head_mlp
    assert mlp.fc1.bias.abs().max() == 0 and mlp.fc2.weight.std() > 0.05


def test_model_forward_backward_and_timm_keys():
    torch.manual_seed(0)
    model = create_model("nested_tnt_t_patch8_32").train()
    x = torch.randn(3, 1, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    keys = set(create_model("tnt_t_patch8_32").state_dict())
    assert keys <= set(model.state_dict())  # TNT's keys, plus the head-MLPs'

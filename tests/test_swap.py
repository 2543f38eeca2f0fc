"""swap_in: timm TNT → tntkernels modules in place, same parameters, same outputs and gradients."""
import copy

import pytest
import torch
import torch.nn as nn

import tntkernels
from tntkernels import _backend, swap_in
from tntkernels.nn import Attention, TNTBlock

timm = pytest.importorskip("timm")
from timm.models import tnt as timm_tnt  # noqa: E402

BACKENDS = ["reference"] + (["cpu"] if _backend.cpp_available() else [])


def small_tnt(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm_tnt.TNT(img_size=32, patch_size=8, embed_dim=96, inner_dim=12, depth=2, num_heads_inner=2,
                        num_heads_outer=3, first_stride=2, num_classes=10, **kwargs)


def assert_same_state(before: dict, model: nn.Module):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, t in before.items():
        assert after[k] is t or (after[k].data_ptr() == t.data_ptr() and torch.equal(after[k], t)), k


@pytest.fixture(scope="module")
def tnt_s():
    torch.manual_seed(0)
    return timm.create_model("tnt_s_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tnt_s_same_logits_state_and_grads(tnt_s, backend):
    ref = tnt_s
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    state = model.state_dict()
    out, report = swap_in(model, backend=backend)
    assert out is model and not model.training
    assert report.num_blocks == 12 and report.num_attentions == 24
    assert report.blocks == [f"blocks.{i}" for i in range(12)]
    assert "blocks.3.attn_out" in report.attentions
    assert str(report).startswith(f"swap_in: replaced 12 TNT blocks (24 attentions) with tntkernels modules "
                                  f"(backend={backend}); ")
    assert report.routing in str(report)
    assert ("F.scaled_dot_product_attention" in report.routing) == (backend != "reference")
    assert all(type(b) is TNTBlock for b in model.blocks)
    assert not any(isinstance(m, (timm_tnt.Block, timm_tnt.Attention)) for m in model.modules())
    assert all(m.backend == backend for m in model.modules() if isinstance(m, Attention))
    # the very same Parameter objects, state_dict unchanged
    assert all(p is params[n] for n, p in model.named_parameters())
    assert_same_state(state, model)

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    want, got = ref(x), model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    want.square().mean().backward()
    got.square().mean().backward()
    ref_params = dict(ref.named_parameters())
    for name in ("blocks.0.attn_in.qk.weight", "blocks.5.attn_out.v.weight", "blocks.11.mlp.fc1.weight",
                 "blocks.2.proj.weight", "pixel_pos", "cls_token", "head.weight"):
        torch.testing.assert_close(params[name].grad, ref_params[name].grad, atol=1e-6, rtol=1e-3, msg=name)
    ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("legacy", [False, True])
def test_small_tnt_train_mode_same_rng(legacy):
    ref = small_tnt(drop_path_rate=0.1, legacy=legacy).train()
    model = copy.deepcopy(ref)
    state = model.state_dict()
    model, report = swap_in(model, backend="reference")
    assert report.num_blocks == 2 and model.training and all(m.training for m in model.modules())
    assert_same_state(state, model)
    assert [b.legacy for b in model.blocks] == [legacy, legacy]
    assert (model.blocks[0].norm2_proj is None) == legacy
    # drop-path rates carried over exactly (timm: linspace → 0, 0.1)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert model.blocks[1].drop_path.drop_prob == ref.blocks[1].drop_path.drop_prob
    # our DropPath draws the same Bernoulli mask as timm's: same seed → same outputs in train mode
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    want = ref(x)
    torch.manual_seed(3)
    got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.manual_seed(4)
    assert not torch.allclose(model(x), got)  # the drop path does draw (so the check above means something)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_dropouts_and_modes_carried():
    ref = small_tnt(proj_drop_rate=0.1, attn_drop_rate=0.2)
    ref.blocks[0].eval()  # mixed modes survive
    model, _ = swap_in(copy.deepcopy(ref))
    blk = model.blocks[1]
    assert blk.attn_in.attn_drop.p == 0.2 and blk.attn_out.proj_drop.p == 0.1 and blk.mlp.drop1.p == 0.1
    assert not model.blocks[0].training and not model.blocks[0].attn_out.training
    assert model.blocks[1].training and model.blocks[1].attn_in.attn_drop.training
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    want = ref(x)
    torch.manual_seed(5)
    got = model(x)  # dropout draws in the same order as timm
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got.sum().backward()  # our attn_drop is not inplace: backward through it works


def test_optimizer_built_before_swap():
    ref = small_tnt()
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    model, _ = swap_in(model, backend="reference")
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for m, o in ((model, opt), (ref, opt_ref)):
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    after, want = model.state_dict(), ref.state_dict()
    assert not torch.equal(after["blocks.1.attn_out.qk.weight"], before["blocks.1.attn_out.qk.weight"])
    for k in want:
        torch.testing.assert_close(after[k], want[k], atol=1e-6, rtol=1e-4, msg=k)


def test_lone_attention_and_bare_block():
    attn = timm_tnt.Attention(16, 16, num_heads=4)
    holder = nn.Sequential(nn.Linear(16, 16), attn)
    x = torch.randn(3, 5, 16)
    want = holder(x)
    holder, report = swap_in(holder)
    assert report.blocks == [] and report.attentions == ["1"] and isinstance(holder[1], Attention)
    assert holder[1].qk is attn.qk
    torch.testing.assert_close(holder(x), want)
    block = timm_tnt.Block(8, 32, num_pixel=4, num_heads_in=2, num_heads_out=4)
    new, report = swap_in(block)  # the root itself is swapped: use the returned module
    assert isinstance(new, TNTBlock) and report.blocks == [""] and report.attentions == ["attn_in", "attn_out"]


def test_duck_typing_without_timm_classes():
    class Attention(nn.Module):  # a copy of timm's, e.g. from the official TNT repository
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim, self.scale = 2, 4, 4 ** -0.5
            self.qk, self.v, self.proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 8)
            self.attn_drop, self.proj_drop = nn.Dropout(0.), nn.Dropout(0.)

        forward = timm_tnt.Attention.forward

    m = nn.Sequential(Attention())
    x = torch.randn(2, 3, 8)
    want = m(x)
    m, report = swap_in(m)
    assert report.attentions == ["0"] and isinstance(m[0], tntkernels.nn.Attention)
    torch.testing.assert_close(m(x), want)


def test_errors():
    with pytest.raises(ValueError, match="no timm TNT Block or Attention found in Linear"):
        swap_in(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        swap_in("tnt_s_patch16_224")
    model, _ = swap_in(small_tnt())
    with pytest.raises(ValueError, match="found in TNT"):  # already swapped: nothing left
        swap_in(model)
    assert tntkernels.swap_in is swap_in


@pytest.mark.interpreter
@pytest.mark.slow
def test_tnt_s_triton_under_interpreter():
    """swap_in(TNT-S, backend="triton") on one 224² image: the inner sub-blocks on the fused Triton
    kernel, the outer attentions (197 tokens) on SDPA; logits and gradients equal timm's. TNT-S's
    widths, shapes and cfg with 3 of its 12 blocks: the interpreter runs every block the same way, at
    ~12 s a block on 2 idle cores."""
    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224", pretrained=False, depth=3).eval()
    model, report = swap_in(copy.deepcopy(ref), backend="triton")
    assert report.num_blocks == 3 and "197 tokens" in str(report)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    want, got = ref(x), model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    want.square().sum().backward()
    got.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-4, rtol=2e-3, msg=name)
    ref.zero_grad(set_to_none=True)

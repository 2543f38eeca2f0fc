"""timm's model API on our models: pretrained weights through timm's machinery (TNT-S from a weights
file saved by timm's own TNT-S: same logits; other class count: head re-initialised; bad files: one-line
errors), forward_intermediates / prune_intermediate_layers / feature_info / group_matcher against timm's
TNT, features_only, gradient checkpointing (less activation memory, same gradients), registration in
timm's registry, the meta device, the no-timm path and `tntkernels-train --pretrained`. CPU.

TNT-S builds take seconds on a small CPU: one module-scoped timm TNT-S and its weights files serve
every TNT-S test; everything else runs on the small models.
"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from tntkernels.models import (PretrainedError, PretrainedMismatchError, create_model, default_pretrained_cfg,
                               list_models, registry)

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
from timm.models.tnt import TNT as TimmTNT  # noqa: E402

SMALL_TNT = dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=96, inner_dim=12, depth=3,
                 num_heads_inner=2, num_heads_outer=3, first_stride=2)
SMALL = ["tnt_t_patch8_32", "nested_tnt_t_patch8_32", "rtnt_n_patch8_32"]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# TNT-S: timm's weights through timm's pretrained machinery
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tnt_s(tmp_path_factory):
    """timm's TNT-S (random init, seeded) and its state_dict saved as .safetensors and .pth."""
    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224").eval()
    # non-trivial biases / norms, so a tensor left at its init would show in the logits
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tnt_s")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    files = {"safetensors": folder / "tnt_s.safetensors", "pth": folder / "tnt_s.pth"}
    safetensors_torch.save_file(sd, str(files["safetensors"]))
    torch.save(sd, files["pth"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = ref.forward_features(x)
        logits = ref.forward_head(feats)
        inter = ref.forward_intermediates(x, indices=3, intermediates_only=True)
    return dict(model=ref, files=files, x=x, feats=feats, logits=logits, inter=inter)


def test_tnt_s_pretrained_from_safetensors_gives_timms_logits(tnt_s):
    ours = create_model("tnt_s_patch16_224", pretrained=True,
                        pretrained_cfg_overlay=dict(file=str(tnt_s["files"]["safetensors"]))).eval()
    for k, v in tnt_s["model"].state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():
        logits = ours(tnt_s["x"])
    torch.testing.assert_close(logits, tnt_s["logits"], rtol=1e-4, atol=1e-4)
    # the cfg is timm's cfg of those weights (hub id, preprocessing), under our name
    cfg = timm.models.get_pretrained_cfg("tnt_s_patch16_224").to_dict()
    assert ours.pretrained_cfg == {**cfg, "architecture": "tnt_s_patch16_224", "file": str(tnt_s["files"]["safetensors"])}
    assert ours.default_cfg is ours.pretrained_cfg


def test_tnt_s_pretrained_from_pth_with_10_classes_reinitialises_the_head(tnt_s):
    ref = tnt_s["model"]
    ours = create_model("tnt_s_patch16_224", pretrained=True, num_classes=10,
                        pretrained_cfg_overlay=dict(file=str(tnt_s["files"]["pth"]))).eval()
    ref_sd, sd = ref.state_dict(), ours.state_dict()
    for k, v in ref_sd.items():
        if not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    assert sd["head.weight"].shape == (10, 384) and ours.num_classes == 10
    assert (sd["head.bias"] == 0).all() and 0.01 < sd["head.weight"].std().item() < 0.03  # fresh trunc-normal
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(tnt_s["x"]), tnt_s["feats"], rtol=1e-4, atol=1e-4)
        assert ours(tnt_s["x"]).shape == (1, 10)


def test_tnt_s_in_timms_registry_features_only_pretrained(tnt_s):
    """The call a timm user makes: timm.create_model with our prefixed name, weights and features."""
    feats = timm.create_model("tntkernels_tnt_s_patch16_224", pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(tnt_s["files"]["safetensors"]))).eval()
    assert feats.feature_info.channels() == [384] * 3 and feats.feature_info.reduction() == [16] * 3
    assert len(feats.model.blocks) == 12  # the last 3 blocks are 9, 10, 11: nothing pruned
    with torch.no_grad():
        out = feats(tnt_s["x"])
    assert [o.shape for o in out] == [(1, 384, 14, 14)] * 3
    for got, want in zip(out, tnt_s["inter"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tnt_cfgs_are_timms_with_and_without_timm(monkeypatch):
    for name, weights in registry.TIMM_WEIGHTS.items():
        want = timm.models.get_pretrained_cfg(weights).to_dict()
        assert default_pretrained_cfg(name) == {**want, "architecture": name}
        monkeypatch.setattr(registry, "_timm", lambda: None)
        fallback = default_pretrained_cfg(name)
        monkeypatch.undo()
        keys = ("hf_hub_id", "tag", "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode",
                "mean", "std", "num_classes", "first_conv", "classifier", "license")
        assert {k: fallback[k] for k in keys} == {k: want[k] for k in keys}, name


# ---------------------------------------------------------------------------------------------
# Pretrained from files on small models: round trip, adaptation, one-line errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    torch.manual_seed(0)
    src = create_model("tnt_t_patch8_32", depth=2)
    path = tmp_path_factory.mktemp("small") / "tnt_t.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    return src, path


def test_small_pretrained_round_trip_and_timms_adaptations(small_file):
    src, path = small_file
    overlay = dict(file=str(path))
    same = create_model("tnt_t_patch8_32", depth=2, pretrained=True, pretrained_cfg_overlay=overlay)
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    # 3 input channels: timm adapts the first conv (sums to 1 channel, repeats, rescales)
    rgb = create_model("tnt_t_patch8_32", depth=2, in_chans=3, pretrained=True, pretrained_cfg_overlay=overlay)
    assert rgb.pixel_embed.proj.weight.shape == (12, 3, 7, 7)
    torch.testing.assert_close(rgb.pixel_embed.proj.weight.sum(1), src.pixel_embed.proj.weight.sum(1))
    # 64² images: 64 sentences instead of 16, the sentence positions are resampled (class token kept)
    big = create_model("tnt_t_patch8_32", depth=2, img_size=64, pretrained=True, pretrained_cfg_overlay=overlay)
    assert big.patch_pos.shape == (1, 65, 96)
    assert torch.equal(big.patch_pos[:, 0], src.patch_pos[:, 0])
    assert torch.equal(big.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


# component renames from timm's TNT names to the official release's (github.com/huawei-noah/Efficient-AI-Backbones)
OFFICIAL_NAMES = {"patch_pos": "outer_pos", "pixel_pos": "inner_pos", "pixel_embed": "patch_embed",
                  "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2", "norm_in": "inner_norm1",
                  "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2", "mlp_in": "inner_mlp",
                  "norm_out": "outer_norm1", "attn_out": "outer_attn", "norm_mlp": "outer_norm2", "mlp": "outer_mlp"}


def test_official_tnt_checkpoint_names_load_through_timms_filter(tmp_path, small_file):
    src, _ = small_file
    official = {}
    for k, v in src.state_dict().items():
        if k == "pixel_pos":  # official layout (1, words, c)
            v = v.flatten(2).transpose(1, 2).contiguous()
        official[".".join(OFFICIAL_NAMES.get(part, part) for part in k.split("."))] = v
    assert "blocks.0.outer_mlp.fc1.weight" in official and "inner_pos" in official
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official}, path)
    m = create_model("tnt_t_patch8_32", depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def _bad_files(folder, src):
    files = {"missing": folder / "nope.safetensors"}
    (folder / "garbage.safetensors").write_bytes(b"\x80\x02not weights" * 64)
    (folder / "garbage.pth").write_bytes(b"\x80\x02not weights" * 64)
    files["garbage_safetensors"] = folder / "garbage.safetensors"
    files["garbage_pth"] = folder / "garbage.pth"
    torch.save({"epoch": torch.tensor(3), "note": "x"}, folder / "not_sd.pth")
    files["not_state_dict"] = folder / "not_sd.pth"
    torch.manual_seed(0)
    for key, kw in (("wrong_shapes", dict(embed_dim=48)), ("missing_blocks", dict(depth=1)),
                    ("five_classes", dict(num_classes=5))):
        path = folder / f"{key}.safetensors"
        safetensors_torch.save_file(create_model("tnt_t_patch8_32", **{"depth": 2, **kw}).state_dict(), str(path))
        files[key] = path
    return files


@pytest.mark.parametrize("case, error, fragments", [
    ("missing", PretrainedError, ["no such file"]),
    ("garbage_safetensors", PretrainedError, ["not a readable"]),
    ("garbage_pth", PretrainedError, ["not a readable"]),
    ("not_state_dict", PretrainedMismatchError, ["state_dict of tensors"]),
    ("wrong_shapes", PretrainedMismatchError, ["another shape", "file (48,", "model (96,"]),
    ("missing_blocks", PretrainedMismatchError, ["missing (blocks.1."]),
    ("five_classes", PretrainedMismatchError, ["5-class head", "num_classes=10"]),
])
def test_bad_weights_files_give_one_line_errors(tmp_path, small_file, case, error, fragments):
    path = _bad_files(tmp_path, small_file[0])[case]
    with pytest.raises(error) as exc:
        create_model("tnt_t_patch8_32", depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = one_line(exc)
    assert msg.startswith("tnt_t_patch8_32: ") and str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    if error is PretrainedMismatchError:
        assert isinstance(exc.value, ValueError)


def test_five_class_file_loads_when_the_cfg_says_so(tmp_path, small_file):
    path = _bad_files(tmp_path, small_file[0])["five_classes"]
    m = create_model("tnt_t_patch8_32", depth=2, num_classes=5, pretrained=True,
                     pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
    want = safetensors_torch.load_file(str(path))
    assert m.head.weight.shape == (5, 96) and torch.equal(m.head.weight, want["head.weight"])


def test_no_weights_and_offline_hub_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(PretrainedError) as exc:
        create_model("rtnt_n_patch8_32", depth=1, pretrained=True)
    assert "no released weights" in one_line(exc)
    hf = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # fail at once instead of a minute of retries
    with pytest.raises(PretrainedError) as exc:
        create_model("tnt_s_patch16_224", depth=1, pretrained=True, cache_dir=str(tmp_path))
    assert "Hugging Face hub ('timm/tnt_s_patch16_224.in1k'" in one_line(exc)


def test_without_timm_random_init_works_and_pretrained_says_why(monkeypatch):
    monkeypatch.setattr(registry, "_timm", lambda: None)
    m = create_model("tnt_t_patch8_32", depth=1)
    assert m.pretrained_cfg["input_size"] == (1, 32, 32) and m.pretrained_cfg["num_classes"] == 10
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    for kw in (dict(pretrained=True), dict(features_only=True)):
        with pytest.raises(ImportError, match="pip install 'timm"):
            create_model("tnt_t_patch8_32", depth=1, **kw)


# ---------------------------------------------------------------------------------------------
# forward_intermediates & co. against timm's TNT
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_pair():
    torch.manual_seed(0)
    ref = TimmTNT(**SMALL_TNT).eval()
    ours = create_model("tnt_t_patch8_32", depth=3).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(indices=2, norm=True),
    dict(indices=[0, -1], output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[1], stop_early=True, intermediates_only=True),
], ids=["all", "last2_norm", "nlc_prefix", "stop_early"])
def test_forward_intermediates_matches_timm(small_pair, kwargs):
    ref, ours = small_pair
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want, got = ref.forward_intermediates(x, **kwargs), ours.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[0], ours.forward_features(x), rtol=1e-5, atol=1e-6)
        want, got = want[1], got[1]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if kwargs.get("return_prefix_tokens"):
            torch.testing.assert_close(g[1], w[1], rtol=1e-4, atol=1e-5)
            g, w = g[0], w[0]
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_api_attributes_match_timm(small_pair):
    ref, ours = small_pair
    assert ours.feature_info == ref.feature_info
    assert ours.no_weight_decay() == ref.no_weight_decay()
    groups = timm.models.group_parameters(ours, ours.group_matcher())
    assert groups == timm.models.group_parameters(ref, ref.group_matcher())
    assert len(groups) == 3 + 2  # stem, 3 blocks, final norm + head
    assert ours.get_classifier() is ours.head
    for m in (ref, ours):
        m2 = type(m)(**SMALL_TNT) if m is ref else create_model("tnt_t_patch8_32", depth=3)
        taken = m2.prune_intermediate_layers([0, -2])
        assert taken == [0, 1] and len(m2.blocks) == 2 and isinstance(m2.head, torch.nn.Identity)
        assert m2.global_pool == "" and isinstance(m2.norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("name", SMALL)
def test_intermediates_features_and_pruning_every_family(name):
    torch.manual_seed(0)
    m = create_model(name, depth=3).eval()
    d, (C, H, W) = m.embed_dim, m.input_size
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x), rtol=1e-5, atol=1e-6)
        assert [t.shape for t in inter] == [(2, d, 4, 4)] * 3
        nlc = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(nlc[0], inter[-1].flatten(2).transpose(1, 2))
    assert m.feature_info == [dict(module=f"blocks.{i}", num_chs=d, reduction=8) for i in range(3)]
    stem = [n for n, _ in m.named_parameters() if not n.startswith(("blocks.", "norm.", "head."))]
    groups = timm.models.group_parameters(m, m.group_matcher())
    assert sorted(groups[0]) == sorted(stem) and len(groups) == 5
    for bad in (dict(output_fmt="NHWC"), dict(indices=4), dict(indices=[3]), dict(indices=[])):
        with pytest.raises(ValueError):
            m.forward_intermediates(x, **bad)
    feats = create_model(name, depth=3, features_only=True, out_indices=(0, 1)).eval()
    assert len(feats.model.blocks) == 2 and feats.feature_info.channels() == [d, d]
    missing, unexpected = feats.model.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.startswith(("blocks.2.", "norm.", "head.")) for k in unexpected)
    with torch.no_grad():
        for got, want in zip(feats(x), inter[:2]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# gradient checkpointing
# ---------------------------------------------------------------------------------------------

def _saved_activation_bytes(model, x) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct non-parameter storages autograd saves for backward during forward.

    A non-reentrant checkpoint saves its region's tensors through its own (inner) hook, so only what
    is kept outside checkpointed blocks reaches this one: the activation memory a backward needs.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(saved.values()), out


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_saves_memory_and_gives_the_same_gradients(name):
    torch.manual_seed(0)
    m = create_model(name, drop_path_rate=0.1).train()  # drop-path and Nested-TNT's logit noise: RNG replayed
    C, H, W = m.input_size
    x = torch.randn(8, C, H, W)
    w = torch.randn(8, m.num_classes)
    runs = {}
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad(set_to_none=True)
        calls = []
        # a pre-hook: a checkpoint's recompute stops once it has what backward needs (early stop)
        hook = m.blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
        torch.manual_seed(1)
        nbytes, out = _saved_activation_bytes(m, x)
        (out * w).sum().backward()
        hook.remove()
        runs[ckpt] = (nbytes, out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, len(calls))
    (plain, out0, g0, calls0), (ckpt, out1, g1, calls1) = runs[False], runs[True]
    assert (calls0, calls1) == (1, 2)  # the block really ran again in backward
    assert torch.equal(out0, out1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    # measured 13× (TNT), 7.5× (Nested-TNT: logits carried between blocks), 16× (RTNT) for 6-12 blocks
    assert plain > 5 * ckpt, (plain, ckpt)


# ---------------------------------------------------------------------------------------------
# timm's registry, the meta device
# ---------------------------------------------------------------------------------------------

def test_every_model_is_registered_in_timm():
    names = timm.list_models("tntkernels_*")
    assert names == sorted(f"tntkernels_{n}" for n in list_models())
    assert timm.list_models("tntkernels_*", pretrained=True) == [
        "tntkernels_tnt_b_patch16_224.in1k", "tntkernels_tnt_s_patch16_224.in1k"]
    cfg = timm.models.get_pretrained_cfg("tntkernels_tnt_s_patch16_224")
    assert cfg.hf_hub_id == "timm/tnt_s_patch16_224.in1k"  # timm's weights, not a hub repo of our name
    m = timm.create_model("tntkernels_rtnt_n_patch8_32", depth=1, num_classes=3)
    assert type(m).__name__ == "RTNT" and m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with warnings.catch_warnings():  # importing again does not register twice (timm would warn)
        warnings.simplefilter("error")
        importlib.reload(importlib.import_module("tntkernels.models.timm_models"))
    assert timm.list_models("tntkernels_*") == names


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_on_the_meta_device(name):
    with torch.device("meta"):
        m = create_model(name)
        t = timm.create_model(f"tntkernels_{name}", num_classes=3)
    assert all(p.is_meta for p in m.parameters()) and all(p.is_meta for p in t.parameters())
    assert t.num_classes == 3 and m.pretrained_cfg["architecture"] == name
    # shape inference on meta (how FSDP users size a model before materialising it)
    x = torch.empty(2, *m.input_size, device="meta")
    assert m(x).shape == (2, m.num_classes) and m(x).is_meta
    assert t(x).shape == (2, 3)
    assert [f.shape for f in m.forward_intermediates(x, intermediates_only=True)] == \
        [f.shape for f in create_model(name).forward_intermediates(torch.randn(2, *m.input_size),
                                                                   intermediates_only=True)]


# ---------------------------------------------------------------------------------------------
# tntkernels-train --pretrained
# ---------------------------------------------------------------------------------------------

def test_train_pretrained_starts_from_the_file(tmp_path, capsys):
    from tntkernels import train

    torch.manual_seed(0)
    src = create_model("tnt_t_patch8_32")
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    base = ["--model", "tnt_t_patch8_32", "--limit-train", "16", "--limit-test", "16", "--batch-size", "16",
            "--epochs", "1", "--lr", "1e-30", "--weight-decay", "0"]
    rc = train.main(base + ["--pretrained", str(path), "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    # one step at lr 1e-30 (AdamW moves each weight by about lr): the trained model is still the file's
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)["model_state"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-20, msg=k)
    for extra, fragment in ((["--pretrained"], "no released weights"),
                            (["--pretrained", str(tmp_path / "nope.pth")], "no such file")):
        capsys.readouterr()
        rc = train.main(base + extra + ["--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and fragment in err, err

"""Named model configurations and `create_model(name, pretrained=..., **kwargs)`, timm-style.

With timm installed, every model is built by timm's own `build_model_with_cfg`, so pretrained weights
(timm's HF-hub / URL / cache, or a local file through `pretrained_cfg_overlay=dict(file=PATH)`), head
re-initialisation when `num_classes` differs from the weights', input-conv adaptation when `in_chans`
differs, and `features_only=True` (timm's `FeatureGetterNet` over `forward_intermediates`) all come
from timm. TNT-S / TNT-B carry timm's pretrained cfg for `tnt_{s,b}_patch16_224`, so
`create_model("tnt_s_patch16_224", pretrained=True)` loads timm's released ImageNet weights into our
model (the state_dicts are the same). Without timm, models build with `pretrained=False` only.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from .nested_tnt import NestedTNT
from .rtnt import RTNT
from .tnt import TNT

# name -> (class, constructor arguments); kwargs given to create_model override these.
_SMALL_TNT = dict(embed_dim=96, inner_dim=12, depth=6, num_heads_inner=2, num_heads_outer=3,
                  first_stride=2, in_chans=1, num_classes=10)  # inner head_dim 6 as TNT-S

MODEL_CONFIGS: dict[str, tuple[type[nn.Module], dict]] = {
    # Han et al. 2021, Table 1; timm's tnt_{s,b}_patch16_224 (non-legacy)
    "tnt_s_patch16_224": (TNT, dict(img_size=224, patch_size=16, embed_dim=384, inner_dim=24, depth=12,
                                    num_heads_inner=4, num_heads_outer=6, first_stride=4)),
    "tnt_b_patch16_224": (TNT, dict(img_size=224, patch_size=16, embed_dim=640, inner_dim=40, depth=12,
                                    num_heads_inner=4, num_heads_outer=10, first_stride=4)),
    # small-image TNTs: 16 sentences of 4×4 words
    "tnt_t_patch8_32": (TNT, dict(img_size=32, patch_size=8, **_SMALL_TNT)),
    "tnt_t_patch7_28": (TNT, dict(img_size=28, patch_size=7, **_SMALL_TNT)),
    # Nested-TNT (docs/tnt-family.md §3): TNT-S / small-image TNT with both levels nested, CODA form
    "nested_tnt_s_patch16_224": (NestedTNT, dict(img_size=224, patch_size=16, embed_dim=384, inner_dim=24, depth=12,
                                                 num_heads_inner=4, num_heads_outer=6, first_stride=4)),
    "nested_tnt_t_patch8_32": (NestedTNT, dict(img_size=32, patch_size=8, **_SMALL_TNT)),
    # RTNT (docs/tnt-family.md §2): 32×32 grey, sentences 8 px, words 4 px, letters 2 px
    "rtnt_n_patch8_32": (RTNT, dict(img_size=32, patch_size=8, word_size=4, letter_size=2, in_chans=1,
                                    num_classes=10, depth=12, sentence_dim=96, word_dim=24, letter_dim=6,
                                    num_heads_sentence=3, num_heads_word=2, num_heads_letter=1)),
    "rtnt_ti_patch8_32": (RTNT, dict(img_size=32, patch_size=8, word_size=4, letter_size=2, in_chans=1,
                                     num_classes=10, depth=12, sentence_dim=192, word_dim=48, letter_dim=12,
                                     num_heads_sentence=3, num_heads_word=4, num_heads_letter=2)),
}

# Our models whose state_dict is that of a timm model with released weights: our name → timm's
# "architecture.tag". Their pretrained cfg is timm's (hub id, preprocessing), so timm finds the weights.
TIMM_WEIGHTS = {"tnt_s_patch16_224": "tnt_s_patch16_224.in1k", "tnt_b_patch16_224": "tnt_b_patch16_224.in1k"}

# Prefix of our models' names in timm's registry (`timm.create_model("tntkernels_tnt_s_patch16_224")`).
TIMM_PREFIX = "tntkernels_"


class PretrainedError(RuntimeError):
    """Pretrained weights could not be loaded: no source, the file is missing or unreadable, the hub
    cannot be reached."""


class PretrainedMismatchError(PretrainedError, ValueError):
    """The weights do not fit the model: other tensor names or shapes, or a class count other than
    the pretrained cfg's."""


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(MODEL_CONFIGS)


def _timm():
    """The timm package, or None when it is not installed."""
    try:
        import timm
        import timm.models
    except Exception:  # not installed, or broken (e.g. built for another torch): build without it
        return None
    return timm


def default_pretrained_cfg(name: str) -> dict:
    """The pretrained cfg of a named model, with timm's keys (url, hf_hub_id, architecture, tag,
    input_size, fixed_input_size, interpolation, crop_pct, crop_mode, mean, std, num_classes,
    pool_size, first_conv, classifier, ...).

    TNT-S / TNT-B: timm's cfg of the released weights (architecture renamed to ours); the other
    models have no released weights: their cfg describes the named config (url and hub id empty).
    """
    cls, cfg = MODEL_CONFIGS[name]
    if name in TIMM_WEIGHTS and (timm := _timm()) is not None:
        return {**timm.models.get_pretrained_cfg(TIMM_WEIGHTS[name]).to_dict(), "architecture": name}
    C, size = cfg.get("in_chans", 3), cfg["img_size"]
    if issubclass(cls, TNT):
        first_conv = "pixel_embed.proj"
    else:
        first_conv = "letter_embed" if cfg.get("letters", True) else "word_embed"
    out = dict(url="", hf_hub_id=None, architecture=name, tag=None, custom_load=False, input_size=(C, size, size),
               fixed_input_size=True, interpolation="bicubic", crop_pct=1.0, crop_mode="center",
               # tntkernels-train normalizes the in-memory data sets with their own statistics; streamed
               # image folders (timm's transforms) use these
               mean=(0.5,) * C, std=(0.5,) * C, num_classes=cfg.get("num_classes", 1000), pool_size=None,
               first_conv=first_conv, classifier="head", license="apache-2.0")
    if name in TIMM_WEIGHTS:  # timm not installed: the same weights' cfg, as timm 1.0 declares it
        out.update(hf_hub_id=f"timm/{TIMM_WEIGHTS[name]}", tag=TIMM_WEIGHTS[name].split(".")[1], crop_pct=0.9,
                   paper_ids="arXiv:2103.00112", paper_name="Transformer in Transformer")
    return out


def create_model(name: str, pretrained: bool = False, pretrained_cfg: dict | str | None = None,
                 pretrained_cfg_overlay: dict | None = None, **kwargs) -> nn.Module:
    """Build a registered model, random init or pretrained (timm's `create_model` arguments).

    Args:
        name: one of `list_models()`.
        pretrained: load weights through timm: from `pretrained_cfg_overlay=dict(file=PATH)` (a
            .safetensors or torch.save'd state_dict; timm's own checkpoints work), else from the
            pretrained cfg's source (TNT-S / TNT-B: timm's released ImageNet-1k weights on the HF hub,
            cached). A head of another class count than `num_classes` is dropped and re-initialised;
            a first conv of other input channels is adapted (timm's rules).
        pretrained_cfg: a cfg dict replacing `default_pretrained_cfg(name)`.
        pretrained_cfg_overlay: entries replacing those of the cfg (file, num_classes, hf_hub_id, ...).
        **kwargs: constructor arguments overriding the named config (num_classes, in_chans, img_size,
            drop_path_rate, backend, device, dtype, ...) and timm's builder arguments (features_only,
            out_indices, cache_dir, ...).
    Returns:
        the model; `model.pretrained_cfg` (= `model.default_cfg`) is the cfg of the weights it was
        built for (timm's rule: it does not follow `num_classes` / `img_size` overrides).
    Raises:
        ValueError: unknown name (the message lists the known ones); bad constructor arguments.
        TypeError: a keyword the model's constructor does not take.
        ImportError: pretrained=True or features_only=True without timm installed.
        PretrainedError: the weights cannot be read (missing file, garbage, hub unreachable, no source).
        PretrainedMismatchError (a ValueError too): the weights do not fit the model (names, shapes,
            a head of another class count than the cfg's num_classes).
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"create_model: unknown model {name!r}; known models: {', '.join(list_models())}")
    if pretrained_cfg is None:
        pretrained_cfg = default_pretrained_cfg(name)
    elif isinstance(pretrained_cfg, str):  # a tag, as in timm's "name.tag"
        if name not in TIMM_WEIGHTS or f"{name}.{pretrained_cfg}" != TIMM_WEIGHTS[name]:
            raise ValueError(f"create_model: {name} has no pretrained tag {pretrained_cfg!r}")
        pretrained_cfg = default_pretrained_cfg(name)
    return build(name, name, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
                 **kwargs)


def build(name: str, variant: str, pretrained: bool, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
    """Build MODEL_CONFIGS[name] as `variant` through timm's `build_model_with_cfg` (or directly
    without timm); `create_model` and our timm entry points (tntkernels.models.timm_models) both end here."""
    cls, cfg = MODEL_CONFIGS[name]
    timm = _timm()
    if timm is None:
        if pretrained or kwargs.get("features_only"):
            raise ImportError(f"{variant}: pretrained weights and features_only come through timm, which is not "
                              f"installed (pip install 'timm>=1.0')")
        for key in ("cache_dir", "features_only", "out_indices"):  # timm's builder arguments
            kwargs.pop(key, None)
        model = cls(**{**cfg, **kwargs})
        model.pretrained_cfg = {**(pretrained_cfg or default_pretrained_cfg(name)), **(pretrained_cfg_overlay or {})}
        return model

    built = []  # the model, once constructed: a failure after this and before the filter is the load's
    filtered = []

    def construct(**model_kwargs):
        built.append(cls(**model_kwargs))
        return built[0]

    def filter_fn(state_dict, model):
        filtered.append(True)
        return adapt_state_dict(state_dict, model, variant)

    # timm's TNT: features are the last 3 blocks by default (`out_indices` picks others)
    depth = kwargs.get("depth", cfg.get("depth", 12))
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", min(3, depth)), feature_cls="getter")
    try:
        return timm.models.build_model_with_cfg(
            construct, variant, pretrained, pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=pretrained_cfg_overlay, feature_cfg=feature_cfg, pretrained_filter_fn=filter_fn,
            **{**cfg, **kwargs})
    except PretrainedError:
        raise
    except Exception as exc:
        if not (pretrained and built) or filtered:
            raise
        source = describe_source(built[0].pretrained_cfg)
        path = built[0].pretrained_cfg.get("file")
        if source.startswith("file") and not os.path.isfile(path):
            why = "no such file"
        elif source.startswith("file"):
            why = f"not a readable .safetensors or torch.save'd state_dict ({type(exc).__name__}: {_first_line(exc)})"
        else:
            why = f"{type(exc).__name__}: {_first_line(exc)}"
        raise PretrainedError(f"{variant}: cannot load pretrained weights from {source}: {why}") from exc


def describe_source(cfg: Mapping) -> str:
    """Where timm loads a pretrained cfg's weights from (its order: state_dict, file, hub, url)."""
    if cfg.get("state_dict") is not None:
        return "the state_dict given in pretrained_cfg"
    if cfg.get("file"):
        return f"file {cfg['file']!r}"
    if cfg.get("hf_hub_id"):
        return f"the Hugging Face hub ({cfg['hf_hub_id']!r}; offline? give a local copy with " \
               f"pretrained_cfg_overlay=dict(file=PATH))"
    if cfg.get("url"):
        return f"URL {cfg['url']!r}"
    return "nowhere (this model has no released weights; give a file with pretrained_cfg_overlay=dict(file=PATH))"


def adapt_state_dict(state_dict, model: nn.Module, variant: str) -> dict:
    """timm's `pretrained_filter_fn` for our models: check the weights against the model before timm
    loads them, so a bad file fails with one line instead of a partial or multi-line load.

    TNT / Nested-TNT weights first go through timm's TNT filter (the official release's key names;
    patch_pos resampled to another grid of sentences); RTNT's sentence_pos is resampled the same way. Leaves to timm what it adapts itself: a first-conv weight of
    other input channels, and a head dropped because the model's class count differs.
    Raises PretrainedMismatchError naming the source, the first few offending tensors and their shapes.
    """
    cfg = model.pretrained_cfg
    source = describe_source(cfg)
    if not isinstance(state_dict, Mapping) or not state_dict \
            or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise PretrainedMismatchError(f"{variant}: {source} does not hold a state_dict of tensors")
    sd = dict(state_dict)
    if isinstance(model, TNT) and ("patch_pos" in sd or "outer_pos" in sd):
        # timm's own TNT filter: the official release's key names (outer_pos, inner_norm1, ...) → timm's,
        # and patch_pos resampled to this model's grid of sentences
        from timm.models.tnt import checkpoint_filter_fn
        try:
            sd = checkpoint_filter_fn(sd, model)
        except Exception as exc:
            raise PretrainedMismatchError(f"{variant}: {source} does not fit the model: timm's TNT checkpoint "
                                          f"filter failed ({type(exc).__name__}: {_first_line(exc)})") from exc
    expected = model.state_dict()
    for key in ("patch_pos", "sentence_pos"):  # (1, 1 + gh·gw, d), class token first
        if key in sd and key in expected and sd[key].shape != expected[key].shape and sd[key].dim() == 3 \
                and sd[key].shape[-1] == expected[key].shape[-1]:
            side = math.isqrt(sd[key].shape[1] - 1)
            if side * side == sd[key].shape[1] - 1:
                from timm.layers import resample_abs_pos_embed
                sd[key] = resample_abs_pos_embed(sd[key], new_size=list(model.grid_size), old_size=[side, side],
                                                 num_prefix_tokens=1)

    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    head_keys = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    for c in classifiers:
        file_classes = sd[f"{c}.weight"].shape[0] if f"{c}.weight" in sd else 0
        if cfg.get("num_classes") is not None and file_classes != cfg["num_classes"]:
            raise PretrainedMismatchError(
                f"{variant}: {source} has a {file_classes}-class head but the pretrained cfg says "
                f"num_classes={cfg['num_classes']}; pass pretrained_cfg_overlay=dict(num_classes={file_classes}, ...)")
    keep_head = getattr(model, "num_classes", None) == cfg.get("num_classes")  # else timm drops the head
    first_convs = cfg.get("first_conv") or ()
    first_convs = {f"{c}.weight" for c in ((first_convs,) if isinstance(first_convs, str) else first_convs)}

    def fits(key: str) -> bool:
        want, got = expected[key].shape, sd[key].shape
        if key in first_convs and len(want) == len(got) == 4:  # timm adapts the input channels
            return want[0] == got[0] and want[2:] == got[2:]
        return want == got

    checked = [k for k in expected if keep_head or k not in head_keys]
    missing = [k for k in checked if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in head_keys]
    wrong = [k for k in checked if k in sd and not fits(k)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensors of another shape (" + "; ".join(
                f"{k}: file {tuple(sd[k].shape)}, model {tuple(expected[k].shape)}" for k in wrong[:3])
                + ("; ..." if len(wrong) > 3 else "") + ")")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise PretrainedMismatchError(f"{variant}: {source} does not fit the model: {', '.join(parts)}")
    return sd


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

"""Named model configurations and `create_model(name, **kwargs)` (timm-style, no pretrained weights)."""
from __future__ import annotations

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


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(MODEL_CONFIGS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model with random init.

    Args:
        name: one of `list_models()`.
        **kwargs: constructor arguments overriding the named config (num_classes, in_chans, img_size,
            drop_path_rate, backend, device, dtype, ...).
    Returns:
        the model; `model.pretrained_cfg` holds {"input_size": (C, H, W), "num_classes": K,
        "architecture": name, ...}.
    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: a keyword the model's constructor does not take.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"create_model: unknown model {name!r}; known models: {', '.join(list_models())}")
    cls, cfg = MODEL_CONFIGS[name]
    model = cls(**{**cfg, **kwargs})
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name}
    return model

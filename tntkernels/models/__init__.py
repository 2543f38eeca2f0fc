"""TNT-family models built from `tntkernels.nn` (TNT, Nested-TNT, RTNT) and a small registry.

    create_model("tnt_s_patch16_224", num_classes=10), list_models()
    create_model("tnt_s_patch16_224", pretrained=True)  # timm's released weights, through timm

With timm installed, importing this package also registers every model in timm's registry as
"tntkernels_<name>" (see `timm_models`), so `timm.create_model("tntkernels_tnt_s_patch16_224")` works.
"""
import importlib.util
import warnings

from .nested_tnt import NestedTNT
from .registry import (MODEL_CONFIGS, PretrainedError, PretrainedMismatchError, create_model,
                       default_pretrained_cfg, list_models)
from .rtnt import RTNT, RTNTBlock, TokenMerge
from .tnt import TNT, PixelEmbed

__all__ = ["TNT", "PixelEmbed", "NestedTNT", "RTNT", "RTNTBlock", "TokenMerge", "create_model", "list_models",
           "MODEL_CONFIGS", "default_pretrained_cfg", "PretrainedError", "PretrainedMismatchError"]

if importlib.util.find_spec("timm") is not None:
    try:
        from . import timm_models  # noqa: F401  (registers tntkernels_* in timm)
    except Exception as exc:  # a broken timm install must not break tntkernels
        warnings.warn(f"tntkernels.models: not registered in timm ({type(exc).__name__}: {exc})", stacklevel=2)

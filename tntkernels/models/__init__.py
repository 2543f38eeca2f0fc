"""TNT-family models built from `tntkernels.nn` (TNT, Nested-TNT, RTNT) and a small registry.

    create_model("tnt_s_patch16_224", num_classes=10), list_models()
"""
from .nested_tnt import NestedTNT
from .registry import MODEL_CONFIGS, create_model, list_models
from .rtnt import RTNT, RTNTBlock, TokenMerge
from .tnt import TNT, PixelEmbed

__all__ = ["TNT", "PixelEmbed", "NestedTNT", "RTNT", "RTNTBlock", "TokenMerge", "create_model", "list_models", "MODEL_CONFIGS"]

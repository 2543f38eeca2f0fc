"""torch.fx support: our modules as timm "notrace" (leaf) modules.

timm's FX feature extraction (`timm.models.FeatureGraphNet`, `timm.layers.create_feature_extractor`,
torchvision's `create_feature_extractor` with timm's tracer arguments) keeps the modules registered
with `timm.layers.register_notrace_module` as single graph calls instead of tracing into them. Ours
choose a kernel from the input's shape, dtype and device, which a tracing Proxy does not have, so
timm should call them whole. Plain `torch.fx.symbolic_trace` works without this: it traces into them,
and their input checks and kernel routing are `torch.fx.wrap`ped graph calls (attention.py, block.py,
nested_attention.py; the models' image check, models/tnt.py).
"""
from __future__ import annotations

import sys


def register_timm_notrace(force_import: bool = False) -> bool:
    """Register tntkernels' TNT modules as timm notrace (FX leaf) modules.

    Args:
        force_import: import timm if it is not imported yet (tntkernels never imports timm on its own).
    Returns:
        True when registered (registering again is harmless: timm keeps a set), False when timm is not
        imported (and force_import is False) or not installed.
    """
    if "timm.layers" not in sys.modules and not force_import:
        return False
    try:
        from timm.layers import register_notrace_module
    except ImportError:
        return False
    from .attention import Attention
    from .block import TNTBlock
    from .nested_attention import NestedAttention
    from .nested_block import NestedTNTBlock
    for cls in (TNTBlock, NestedTNTBlock, Attention, NestedAttention):
        register_notrace_module(cls)
    return True

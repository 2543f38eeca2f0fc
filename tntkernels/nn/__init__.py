"""Drop-in modules keeping timm's parameter names, so `load_state_dict` just works."""
from ._fx import register_timm_notrace
from .attention import Attention
from .block import TNTBlock, fused_inner_sublayer
from .hsim import HsimSplitLinear
from .layers import DropPath, Mlp
from .nested_attention import HeadMlp, NestedAttention
from .nested_block import NestedTNTBlock

__all__ = ["Attention", "TNTBlock", "Mlp", "DropPath", "fused_inner_sublayer", "NestedAttention", "HeadMlp",
           "NestedTNTBlock", "HsimSplitLinear", "register_timm_notrace"]

register_timm_notrace()  # only when timm is already imported; swap_in registers them otherwise

"""Drop-in modules keeping timm's parameter names, so `load_state_dict` just works."""
from .attention import Attention
from .block import TNTBlock, fused_inner_sublayer
from .layers import DropPath, Mlp

__all__ = ["Attention", "TNTBlock", "Mlp", "DropPath", "fused_inner_sublayer"]

"""Small building blocks with timm's parameter names (Mlp: fc1/fc2) so state_dicts match."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn


class Mlp(nn.Module):
    """Linear(in, hidden) → act → dropout → Linear(hidden, out) → dropout; keys `fc1`, `fc2` as timm."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0., bias: bool = True, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): zero a residual branch with probability p."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        if isinstance(drop_prob, bool) or not isinstance(drop_prob, numbers.Real):
            raise TypeError(f"DropPath: drop_prob must be a float in [0, 1), got {type(drop_prob).__name__}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"

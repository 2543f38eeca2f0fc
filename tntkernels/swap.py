"""Patch a timm TNT model in place so its blocks and attentions run on tntkernels (Liger-style patcher).

    model = timm.create_model("tnt_s_patch16_224", pretrained=True)
    model, report = tntkernels.swap_in(model)     # same parameters, same state_dict, our kernels
    print(report)  # swap_in: replaced 12 TNT blocks (24 attentions) with tntkernels modules (backend=None); ...

Nothing is copied: the existing parameter tensors, norms, MLPs and activations are moved into the new
modules, so an optimizer built before the swap keeps updating the model, and `model.state_dict()` keys
and values are unchanged. timm is optional: its classes are matched with `isinstance` when
`timm.models.tnt` has been imported, and by duck typing (class name + attributes) otherwise.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import chain

import torch.nn as nn

from .nn import Attention, DropPath, Mlp, TNTBlock, register_timm_notrace
from .nn.attention import MAX_KERNEL_TOKENS

_BLOCK_ATTRS = ("norm_in", "attn_in", "norm_mlp_in", "mlp_in", "norm1_proj", "proj", "norm2_proj",
                "norm_out", "attn_out", "drop_path", "norm_mlp", "mlp")
_ATTENTION_ATTRS = ("qk", "v", "proj", "num_heads", "head_dim")


@dataclass
class SwapReport:
    """What `swap_in` replaced: module paths (as in `model.named_modules()`) of the TNT blocks and of
    every attention (those inside the blocks included), and the backend given to the new modules."""

    blocks: list[str] = field(default_factory=list)
    attentions: list[str] = field(default_factory=list)
    backend: str | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_attentions(self) -> int:
        return len(self.attentions)

    @property
    def routing(self) -> str:
        """Where the new attentions send each call (tntkernels.nn.attention_route)."""
        if self.backend == "reference":
            return "every attention runs the PyTorch reference"
        return (f"sequences of <= {MAX_KERNEL_TOKENS} tokens (the inner, word-level attentions) run "
                f"tntkernels.inner_attention (backend={self.backend}); longer ones (the outer, sentence-level "
                f"attentions: 197 tokens at 224²) and shapes the backend does not cover run "
                f"F.scaled_dot_product_attention")

    def __str__(self) -> str:
        return (f"swap_in: replaced {self.num_blocks} TNT blocks ({self.num_attentions} attentions) "
                f"with tntkernels modules (backend={self.backend}); {self.routing}")


def _timm_class(name: str) -> type | None:
    """timm.models.tnt.<name> if timm's TNT module is already imported (a timm instance cannot exist
    otherwise), else None: timm is never imported here."""
    tnt = sys.modules.get("timm.models.tnt")
    cls = getattr(tnt, name, None)
    return cls if isinstance(cls, type) else None


def _is_block(m: nn.Module) -> bool:
    if isinstance(m, TNTBlock):
        return False
    cls = _timm_class("Block")
    if cls is not None and isinstance(m, cls):
        return True
    return type(m).__name__ == "Block" and all(hasattr(m, a) for a in _BLOCK_ATTRS)


def _is_attention(m: nn.Module) -> bool:
    if isinstance(m, Attention):
        return False
    cls = _timm_class("Attention")
    if cls is not None and isinstance(m, cls):
        return True
    return (type(m).__name__ == "Attention" and all(hasattr(m, a) for a in _ATTENTION_ATTRS)
            and all(isinstance(getattr(m, a), nn.Linear) for a in ("qk", "v", "proj")))


def _dropout_p(m: nn.Module | None) -> float:
    return float(getattr(m, "p", 0.0)) if m is not None else 0.0


def _tensor_ids(m: nn.Module) -> set[int]:
    return {id(t) for t in chain(m.parameters(), m.buffers())}


def _check_moved(new: nn.Module, old_ids: set[int], what: str) -> None:
    """Every tensor of `new` must be one of the old module's (`old_ids`): the new module is built on the
    meta device and its own tensors are all replaced. Checked by identity, so that a timm model that is
    itself on the meta device (built for FSDP, materialised later with `to_empty`) is swapped too."""
    left = [n for n, t in chain(new.named_parameters(), new.named_buffers()) if id(t) not in old_ids]
    if left:
        raise RuntimeError(f"swap_in: {what} has tensors with no counterpart in the timm module: {left}")


def _swap_attention(old: nn.Module, backend: str | None) -> Attention:
    old_ids = _tensor_ids(old)
    dim, hidden_dim = old.v.in_features, old.qk.out_features // 2
    new = Attention(dim, hidden_dim, num_heads=old.num_heads, qkv_bias=old.qk.bias is not None,
                    attn_drop=_dropout_p(getattr(old, "attn_drop", None)),
                    proj_drop=_dropout_p(getattr(old, "proj_drop", None)), device="meta", backend=backend)
    new.qk, new.v, new.proj = old.qk, old.v, old.proj
    new.head_dim, new.scale = old.head_dim, getattr(old, "scale", old.head_dim ** -0.5)
    # fresh, not-inplace dropouts: timm's inplace attn_drop would overwrite softmax's saved output
    new.attn_drop.training = new.proj_drop.training = new.training = old.training
    _check_moved(new, old_ids, "Attention")
    return new


def _swap_mlp(old: nn.Module) -> nn.Module:
    """timm's Mlp → ours (same fc1/act/drop1/fc2/drop2 modules); any other MLP is kept as it is."""
    parts = ("fc1", "act", "drop1", "fc2", "drop2")
    if not (all(hasattr(old, p) for p in parts) and isinstance(old.fc1, nn.Linear)
            and isinstance(old.fc2, nn.Linear) and isinstance(getattr(old, "norm", nn.Identity()), nn.Identity)):
        return old
    new = Mlp(old.fc1.in_features, old.fc1.out_features, old.fc2.out_features, device="meta")
    for p in parts:
        setattr(new, p, getattr(old, p))
    new.training = old.training
    return new


def _swap_drop_path(old: nn.Module) -> nn.Module:
    """timm's DropPath (scale_by_keep=True: same Bernoulli draw, same scaling) → ours; others kept."""
    p = getattr(old, "drop_prob", None)
    if isinstance(old, nn.Identity) or p is None or not getattr(old, "scale_by_keep", True) or not 0 <= p < 1:
        return old
    new = DropPath(float(p)) if p > 0 else nn.Identity()
    new.training = old.training
    return new


def _swap_block(old: nn.Module, backend: str | None) -> TNTBlock:
    old_ids = _tensor_ids(old)
    dim, dim_out = old.attn_in.v.in_features, old.attn_out.v.in_features
    legacy = old.norm2_proj is None
    new = TNTBlock(dim, dim_out, num_pixel=old.proj.in_features // dim,
                   num_heads_in=old.attn_in.num_heads, num_heads_out=old.attn_out.num_heads,
                   qkv_bias=old.attn_in.qk.bias is not None, legacy=legacy, device="meta", backend=backend)
    for name in ("norm_in", "norm_mlp_in", "norm1_proj", "proj", "norm_out", "norm_mlp"):
        setattr(new, name, getattr(old, name))
    if not legacy:
        new.norm2_proj = old.norm2_proj
    new.attn_in = _swap_attention(old.attn_in, backend)
    new.attn_out = _swap_attention(old.attn_out, backend)
    new.mlp_in, new.mlp = _swap_mlp(old.mlp_in), _swap_mlp(old.mlp)
    new.drop_path = _swap_drop_path(old.drop_path)
    new.training = old.training
    _check_moved(new, old_ids, "TNTBlock")
    return new


def swap_in(model: nn.Module, *, backend: str | None = None) -> tuple[nn.Module, SwapReport]:
    """Replace, in place, every timm TNT `Block` with `tntkernels.nn.TNTBlock` and every other timm TNT
    `Attention` with `tntkernels.nn.Attention`, keeping the same parameters.

    The parameter tensors and the norm, Linear, MLP and activation modules are moved, not copied: the
    state_dict (keys, order, values, storage) is unchanged, an optimizer built before the swap keeps
    working, and device, dtype, requires_grad and train/eval mode stay as they were. Drop-path rates and
    dropout probabilities carry over; our DropPath draws the same Bernoulli mask as timm's, so under the
    same seed train-mode outputs match too. Hooks registered on the replaced modules are not carried.
    A model on the meta device (built for FSDP) is swapped the same way: its meta tensors are moved and
    stay meta; the swapped model runs shape inference on meta inputs and is materialised as usual
    (`model.to_empty(device=...)`, then each module's `reset_parameters` / the model's init). Our modules
    work under torch.fx: timm's FX feature extraction calls them whole (they are registered as timm
    notrace modules here), and plain `torch.fx.symbolic_trace` traces into them.

    Args:
        model: an nn.Module holding timm TNT blocks or attentions (`timm.create_model("tnt_s_patch16_224")`,
            `timm.models.tnt.TNT(...)` with any legacy / width / depth, or any model built from the same
            classes). Matched by `isinstance` when timm's TNT module is imported, else by class name and
            attributes (`Block`: attn_in, attn_out, norm1_proj, proj, ...; `Attention`: qk, v, proj).
        backend: given to every inserted module, then to `tntkernels.inner_attention`: None (best
            available), "reference", "cpu", "triton" or "cuda".
    Returns:
        (model, report): the same model object, except when `model` itself is a timm Block or Attention,
        in which case its replacement; and a `SwapReport` (module paths of the replaced blocks and
        attentions, their counts, a one-line `str`).
    Raises:
        TypeError: model is not an nn.Module.
        ValueError: model holds no timm TNT Block or Attention.
    Source: timm `models/tnt.py` (Block, Attention); Liger-Kernel's `apply_liger_kernel_to_*` patchers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_in: model must be a torch.nn.Module, got {type(model).__name__}")
    report = SwapReport(backend=backend)
    done: dict[int, nn.Module] = {}  # id(old) → new, so a module shared by several parents is swapped once

    def swap(m: nn.Module, path: str) -> nn.Module | None:
        if id(m) in done:
            return done[id(m)]
        if _is_block(m):
            new = _swap_block(m, backend)
            report.blocks.append(path)
            report.attentions += [f"{path}.attn_in" if path else "attn_in", f"{path}.attn_out" if path else "attn_out"]
        elif _is_attention(m):
            new = _swap_attention(m, backend)
            report.attentions.append(path)
        else:
            return None
        done[id(m)] = new
        return new

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            new = swap(child, path)
            if new is None:
                walk(child, path)
            else:
                setattr(parent, name, new)

    register_timm_notrace()  # timm's FX feature extraction then calls our modules whole (nn/_fx.py)
    root = swap(model, "")
    if root is None:
        walk(model, "")
        root = model
    if not report.blocks and not report.attentions:
        raise ValueError(f"swap_in: no timm TNT Block or Attention found in {type(model).__name__}; expected "
                         f"timm.models.tnt.Block / Attention modules (timm.create_model('tnt_s_patch16_224'))")
    return root, report

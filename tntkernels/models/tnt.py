"""TNT (Transformer in Transformer) built from `tntkernels.nn`, state_dict-compatible with timm.

Only the official pixel embedding (timm's non-legacy `TNT`) is provided: the image is cut into
p×p sentences first, and each sentence goes through its own Conv2d(7, stride, padding 3), so no
word sees pixels of a neighbouring sentence.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.utils.checkpoint

from ..nn import TNTBlock

GLOBAL_POOLS = ("", "token", "avg")


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


@torch.fx.wrap
def check_image(model: str, x: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """Raise ValueError unless x is (B, C, H, W) with (C, H, W) == input_size; returns x.

    One graph call under torch.fx (`torch.fx.wrap`; a module calling it must wrap its own name too):
    a Proxy has no shape, so the check runs when the traced module runs, on its real input."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_size):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{model}: expected images of shape (B, C, H, W) with (C, H, W) = {tuple(input_size)}, "
                         f"got {got}")
    return x


def init_weights(module: nn.Module) -> None:
    """timm's TNT init: trunc-normal(std .02) Linear weights, zero biases, LayerNorm (1, 0).

    Conv2d keeps PyTorch's default init (timm does not touch it either).
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: linear from 0 to `drop_path_rate` (timm's rule)."""
    return torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()


def take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """Which blocks' outputs to take, timm's convention: None = all, int n = the last n, a sequence =
    those block indices (negative counts from the end). Returns (the indices in the order given, the largest).

    Raises ValueError for an index outside the model (timm asserts).
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"the last {indices} blocks: expected 1 to {num_blocks} (the model has {num_blocks} blocks)")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = [num_blocks + i if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, taken) if not 0 <= t < num_blocks]
        if bad or not taken:
            raise ValueError(f"block indices {list(indices)}: expected a non-empty list in [{-num_blocks}, "
                             f"{num_blocks - 1}] (the model has {num_blocks} blocks)")
    return taken, max(taken)


class ClassifierHead:
    """timm's model API shared by TNT, Nested-TNT and RTNT: the classifier (pooling of the sentence
    tokens, head dropout, `head`, `get_classifier` / `reset_classifier`, `forward_head`, `forward`),
    `forward_features`, `forward_intermediates` / `prune_intermediate_layers` (timm's feature
    extraction: `features_only=True`), `set_grad_checkpointing`, `group_matcher` and `default_cfg`.

    The model sets `embed_dim`, `num_prefix_tokens`, `global_pool`, `num_classes`, `head_drop`,
    `head`, `norm`, `blocks`, `feature_info`, `grad_checkpointing`, `pretrained_cfg` and `grid_size`
    ((sentence rows, sentence columns)), and defines
      * `_initial_state(x)`: images → the tuple of token tensors the first block takes;
      * `_SENTENCES`: where the sentence tokens (B, N + 1, d) sit in that tuple (each block maps the
        tuple to the next one of the same layout);
      * `_STEM`: regex of the parameters before the first block (for `group_matcher`).
    """

    _SENTENCES = 1
    _STEM = ""

    @property
    def default_cfg(self) -> dict:
        """timm's old name of `pretrained_cfg` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh Linear(d, num_classes) (Identity when 0), init as at construction.

        `pretrained_cfg` keeps describing the weights the model was built from (timm's rule); the
        model's own class count is `num_classes`.
        Raises ValueError when global_pool is not one of "", "token", "avg".
        """
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"{type(self).__name__}: global_pool must be one of {GLOBAL_POOLS}, "
                                 f"got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else self.cls_token
        self.head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.apply(init_weights)
        self.head.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (torch.utils.checkpoint,
        non-reentrant): activation memory of the blocks drops to their inputs, for one more forward."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise LR decay: the stem, then one group per block, then
        the final norm (the head falls in the last group)."""
        return {"stem": self._STEM, "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def _run_block(self, block: nn.Module, state: tuple) -> tuple:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            # preserve_rng_state (default) replays drop-path / dropout / logit-noise draws exactly
            return torch.utils.checkpoint.checkpoint(block, *state, use_reentrant=False)
        return block(*state)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → normalized sentence tokens (B, N + 1, d), class token first."""
        state = self._initial_state(x)
        for block in self.blocks:
            state = self._run_block(block, state)
        return self.norm(state[self._SENTENCES])  # (B, N+1, d)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The sentence tokens after chosen blocks (timm's feature-extraction API).

        Args:
            x: images (B, C, H, W).
            indices: None = every block, int n = the last n blocks, sequence = those block indices.
            return_prefix_tokens: pair each intermediate with its class token (B, 1, d).
            norm: apply the final norm to each intermediate.
            stop_early: skip the blocks after the last one taken.
            output_fmt: "NCHW" → (B, d, H/p, W/p) maps; "NLC" → (B, N, d) tokens. The class token is
                dropped from both.
            intermediates_only: return only the list.
        Returns:
            the list of intermediates, or (final normalized tokens (B, N + 1, d), the list).
        Raises:
            ValueError: output_fmt not "NCHW" / "NLC"; an index outside the model; a bad image.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, last = take_indices(len(self.blocks), indices)
        B = x.shape[0]
        state = self._initial_state(x)
        blocks = self.blocks[:last + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            state = self._run_block(block, state)
            if i in taken:
                sentences = state[self._SENTENCES]
                intermediates.append(self.norm(sentences) if norm else sentences)  # (B, N+1, d)
        prefix = [t[:, :self.num_prefix_tokens] for t in intermediates]  # (B, 1, d)
        intermediates = [t[:, self.num_prefix_tokens:] for t in intermediates]  # (B, N, d)
        if output_fmt == "NCHW":
            gh, gw = self.grid_size
            intermediates = [t.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                             for t in intermediates]  # (B, d, gh, gw)
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(state[self._SENTENCES]), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last index (and the final norm / head if asked); returns the
        indices as absolute block numbers (negative ones would no longer mean the same blocks)."""
        taken, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Sentence tokens (B, N + 1, d) → logits (B, K), or pooled features (B, d) if pre_logits."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, d)
        elif self.global_pool == "token":
            x = x[:, 0]  # (B, d)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def feature_info(depth: int, num_chs: int, reduction: int) -> list[dict]:
    """timm's feature_info of a ViT-like model: every block's output, same width and stride."""
    return [{"module": f"blocks.{i}", "num_chs": num_chs, "reduction": reduction} for i in range(depth)]


class PixelEmbed(nn.Module):
    """Official TNT pixel embedding: sentences (p×p patches) → words of width c.

    Args:
        img_size: (H, W) or int.  patch_size: sentence size (p_h, p_w) or int.
        in_chans: C.  in_dim: word width c.  stride: conv stride (TNT: 4).
    Shapes:
        forward(x (B, C, H, W), pixel_pos (1, c, s_h, s_w)) → words (B·N, s_h·s_w, c), x's dtype,
        where N = (H / p_h)·(W / p_w) sentences and s = ceil(p / stride) words per side; word index
        = row·s_w + col.
    Source: Han et al. 2021 (TNT) §2.2; timm `PixelEmbed` (legacy=False) for names and layout.
    """

    legacy = False  # the official embedding; timm's TNT checkpoint filter reads it

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, in_dim: int = 48, stride: int = 4, device=None, dtype=None):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        self.in_dim = in_dim
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # conv output side with kernel 7, padding 3: floor((p - 1) / stride) + 1 = ceil(p / stride)
        self.new_patch_size = [math.ceil(p / stride) for p in self.patch_size]
        self.proj = nn.Conv2d(in_chans, in_dim, kernel_size=7, padding=3, stride=stride, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        gh, gw = self.grid_size
        ph, pw = self.patch_size
        x = x[:, :, :gh * ph, :gw * pw]  # nn.Unfold drops a remainder too
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, ph, pw)
        x = x.reshape(B * self.num_patches, C, ph, pw)  # (B·N, C, ph, pw), sentences row-major
        x = self.proj(x) + pixel_pos  # (B·N, c, s_h, s_w)
        return x.flatten(2).transpose(1, 2)  # (B·N, s_h·s_w, c)


class TNT(ClassifierHead, nn.Module):
    """Transformer in Transformer, drop-in for timm's `TNT` (non-legacy), running on our kernels.

    Args (as timm):
        img_size: (H, W) or int.  patch_size: sentence size p (int or pair).  in_chans: C.
        num_classes: K (0 = no head, forward returns pooled features).
        global_pool: "token" (class token), "avg" (mean of sentence tokens) or "" (no pooling).
        embed_dim: sentence width d.  inner_dim: word width c.  depth: blocks.
        num_heads_inner / num_heads_outer: heads of the word / sentence attention.
        mlp_ratio: sentence MLP hidden = d · mlp_ratio (the word MLP is always 4c).
        qkv_bias: bias in qk and v (TNT: False).
        drop_rate: dropout before the head.  pos_drop_rate: dropout after the position embedding.
        proj_drop_rate, attn_drop_rate: dropouts inside attention / MLP.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        norm_layer: LayerNorm class.  first_stride: stride of the pixel-embedding conv (words per side
            = ceil(p / first_stride)).  device, dtype: of the parameters.
        backend: forwarded to every attention (None = best available; see `tntkernels.inner_attention`).
    Shapes:
        forward(x (B, C, H, W) float) → logits (B, K) (or (B, d) when num_classes = 0).
        forward_features(x) → normalized sentence tokens (B, N + 1, d), class token at index 0.
        forward_head(tokens (B, N + 1, d), pre_logits=False) → (B, K), or pooled (B, d) if pre_logits.
        forward_intermediates(x, indices) → sentence tokens after those blocks as (B, d, H/p, W/p)
            maps (see `ClassifierHead`); `feature_info` lists every block (d channels, reduction p).
        Internally: words (B·N, m, c), sentences (B, N + 1, d); N = (H/p)·(W/p), m = ceil(p/first_stride)².
    Raises:
        ValueError: global_pool not one of "", "token", "avg"; image smaller than one patch;
            input not (B, C, H, W) with the configured (C, H, W).
    Source: Han et al. 2021, "Transformer in Transformer" (arXiv 2103.00112); parameter names,
        layouts and init follow timm `timm/models/tnt.py`, so timm's `tnt_*` state_dicts load strictly.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768,
                 inner_dim: int = 48, depth: int = 12, num_heads_inner: int = 4, num_heads_outer: int = 12,
                 mlp_ratio: float = 4., qkv_bias: bool = False, drop_rate: float = 0., pos_drop_rate: float = 0.,
                 proj_drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm, first_stride: int = 4, device=None, dtype=None,
                 backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"TNT: global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        img_hw, patch_hw = _pair(img_size), _pair(patch_size)
        if img_hw[0] < patch_hw[0] or img_hw[1] < patch_hw[1]:
            raise ValueError(f"TNT: img_size {img_hw} is smaller than patch_size {patch_hw}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.backend = backend
        self.input_size = (in_chans, img_hw[0], img_hw[1])
        self.grad_checkpointing = False

        self.pixel_embed = PixelEmbed(img_hw, patch_hw, in_chans, inner_dim, first_stride, **dd)
        self.num_patches = num_patches = self.pixel_embed.num_patches
        self.grid_size = self.pixel_embed.grid_size
        s_h, s_w = self.pixel_embed.new_patch_size
        self.num_pixel = num_pixel = s_h * s_w  # words per sentence m

        # stem: words of a sentence → one sentence token
        self.norm1_proj = norm_layer(num_pixel * inner_dim, **dd)
        self.proj = nn.Linear(num_pixel * inner_dim, embed_dim, **dd)
        self.norm2_proj = norm_layer(embed_dim, **dd)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim, **dd))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, s_h, s_w, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        self.blocks = nn.ModuleList([
            self._make_block(inner_dim, embed_dim, num_pixel, num_heads_in=num_heads_inner,
                             num_heads_out=num_heads_outer, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                             proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr,
                             norm_layer=norm_layer, backend=backend, **dd)
            for dpr in drop_path_rates(drop_path_rate, depth)])
        self.feature_info = feature_info(depth, embed_dim, max(patch_hw))
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(p, std=.02)
        self.apply(init_weights)
        # what `create_model` replaces with the named model's full cfg (timm's keys)
        self.pretrained_cfg = {"input_size": self.input_size, "num_classes": num_classes,
                               "first_conv": "pixel_embed.proj", "classifier": "head"}

    _STEM = r"^(?:cls_token|patch_pos|pixel_pos|pixel_embed\.|norm[12]_proj\.|proj\.)"

    def _make_block(self, *args, **kwargs) -> nn.Module:
        """One block (subclasses swap in their own kind)."""
        return TNTBlock(*args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"patch_pos", "pixel_pos", "cls_token"}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (words (B·N, m, c), sentences (B, N + 1, d)) before the first block."""
        x = check_image(type(self).__name__, x, self.input_size)
        B = x.shape[0]
        words = self.pixel_embed(x, self.pixel_pos)  # (B·N, m, c)
        sentences = self.norm2_proj(self.proj(self.norm1_proj(words.reshape(B, self.num_patches, words.shape[1] * words.shape[2]))))  # (B, N, d)
        sentences = torch.cat([self.cls_token.expand(B, -1, -1), sentences], dim=1)  # (B, N+1, d)
        return words, self.pos_drop(sentences + self.patch_pos)

    def _initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(x)  # (words (B·N, m, c), sentences (B, N+1, d)): what a TNTBlock takes

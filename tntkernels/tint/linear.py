"""TinT's simulated linear layer: forward, backward and descent of an auxiliary y = W x + b run
inside TinT's embeddings, with the weights held in K prefix rows.

Source: Panigrahi, Malladi, Xia, Arora, "Trainable Transformer in Transformer", arXiv 2307.01189
(ICML 2024): §2.2–2.3 (prefix embeddings, "stacking" S rows of W per prefix), §3 (H_sim-split linear
operations), §4.1 "Linear layer" (Linear Forward: Fig. 2 / Eq. (1)–(2); Linear Backward: Fig. 4;
Linear Descent: Fig. 5, Eq. (3)). Spec: docs/tint.md §2.

Layout (everything in units of embedding coordinates; ``D = d_sim``):

* ``h`` has shape (B, K + T, D): K prefix rows, then T token rows.
* Prefix j (0 ≤ j < K) holds rows S·j … S·j+S−1 of W (S = dout / K), row-major, in coordinates
  [0, S·din), then a copy of b in [S·din, S·din + dout). Only prefix 0's copy of b is read or updated.
* Token t holds x_t in coordinates [0, din) before Linear Forward; afterwards y_t in [0, dout) and
  x_t in the memory slot [mem, mem + din). Linear Backward / Descent expect the token rows to hold
  dy_t in [0, dout) and x_t in [mem, mem + din).

The mechanism (TinT's attention heads have width K, so there are H = D / K heads; a row of W is
cut into P = din / K shards, shard m of row S·j + r sits in head (r, m) = r·P + m of prefix j):

* Forward: the query (an H_sim-split *mix*) copies shard m of x_t into every head (r, m); the key
  (an H_sim-split *block* map, identity on the weight heads) is the prefix's own shard; the value is
  the prefix's one-hot position e_j, so head (r, m) of token t returns the K partial dot products
  <x_t[m], W[S·j + r][m]>, j < K. The bias heads attend only to prefix 0 and return b. An output
  mix sums the shards (Σ_m), leaving y in a "grid" order (coordinate r·K + j holds y[S·j + r]) and
  b next to it; a fixed permutation (an H_sim-split block map with dout-wide heads) restores row
  order and adds b.
* Backward: query = dy reordered to grid order and copied into each head (r, m); key = the
  prefix one-hot; value = the prefix's weight shard; an output mix sums over r, giving
  dx = Wᵀ dy in [0, din).
* Descent: prefix rows attend to the training tokens: query = prefix one-hot, key = reordered dy,
  value = −η · x_t shard m (an H_sim-split mix reading the memory slot), so prefix j's head (r, m)
  receives −η Σ_t dy_t[S·j + r] x_t[m] exactly where that shard of W is stored. The bias heads of
  prefix 0 receive −η Σ_t dy_t. The prefix rows are updated residually; token rows are unchanged.

TinT runs the descent as a dense (K+T)² attention whose only non-zero block is prefix-by-token; here
that block is computed directly (one dyᵀx-sized contraction), as the spec permits. One-hot
positional queries / keys are applied as the identity they are (the score is the matching
coordinate), which is exact. All maps that TinT realises as H_sim-split linear layers go through
``tntkernels.hsim_split_linear``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import hsim_split_linear
from ..ops._checks import FLOAT_DTYPES


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearLayout:
    """Where an auxiliary linear layer W (dout × din), b (dout) lives inside TinT's embeddings.

    Args:
        din: input width of the auxiliary layer (≥ 1, a multiple of ``num_prefixes``).
        dout: output width (≥ 1, a multiple of ``num_prefixes``).
        d_sim: TinT's embedding width D_sim (a multiple of ``num_prefixes``).
        num_prefixes: K, the number of prefix rows (≥ 1); also TinT's attention head width here.
        memory_index: start of the memory slot [mem, mem + din) where Linear Forward keeps x_t;
            a multiple of K with mem ≥ max(din, dout) and mem + din ≤ d_sim. None picks the
            smallest multiple of K that is ≥ max(din, dout).
    Derived (attributes): S = dout / K weight rows per prefix; P = din / K shards per row;
        H = d_sim / K heads; n_weight_heads = S·P; bias heads [S·P, S·P + S).
    Raises:
        TypeError: a size is not an int.
        ValueError: a size is < 1; din, dout or d_sim is not a multiple of K; S·din + dout > d_sim
            (weights and bias do not fit a prefix row); the memory slot is misaligned, overlaps
            [0, max(din, dout)) or runs past d_sim.
    Source: arXiv 2307.01189 §2.3 (stacking), §4.1 (Linear Forward, memory slot for backward).
    """

    din: int
    dout: int
    d_sim: int
    num_prefixes: int
    memory_index: int | None = None

    def __post_init__(self):
        for name in ("din", "dout", "d_sim", "num_prefixes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LinearLayout: {name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"LinearLayout: {name} must be >= 1, got {v}")
        K, din, dout, D = self.num_prefixes, self.din, self.dout, self.d_sim
        if dout % K:
            raise ValueError(f"LinearLayout: dout={dout} must be divisible by num_prefixes K={K} "
                             f"(S = dout / K rows of W are stacked per prefix)")
        if din % K:
            raise ValueError(f"LinearLayout: din={din} must be divisible by num_prefixes K={K} "
                             f"(each weight row is cut into din / K shards of one width-K attention head)")
        if D % K:
            raise ValueError(f"LinearLayout: d_sim={D} must be divisible by num_prefixes K={K} "
                             f"(TinT's attention heads here have width K)")
        S = dout // K
        if S * din + dout > D:
            raise ValueError(f"LinearLayout: a prefix row needs S·din + dout = {S}·{din} + {dout} = "
                             f"{S * din + dout} coordinates (weights then bias) but d_sim={D}")
        mem = self.memory_index
        if mem is None:
            mem = -(-max(din, dout) // K) * K
            object.__setattr__(self, "memory_index", mem)
        elif isinstance(mem, bool) or not isinstance(mem, int):
            raise TypeError(f"LinearLayout: memory_index must be an int or None, got {type(mem).__name__}")
        if mem % K:
            raise ValueError(f"LinearLayout: memory_index={mem} must be a multiple of num_prefixes K={K} "
                             f"(the memory slot is read head-wise)")
        if mem < max(din, dout):
            raise ValueError(f"LinearLayout: memory_index={mem} overlaps the signal [0, max(din, dout)) = "
                             f"[0, {max(din, dout)})")
        if mem + din > D:
            raise ValueError(f"LinearLayout: memory slot [{mem}, {mem + din}) runs past d_sim={D}")

    @property
    def S(self) -> int:
        return self.dout // self.num_prefixes

    @property
    def P(self) -> int:
        return self.din // self.num_prefixes

    @property
    def H(self) -> int:
        return self.d_sim // self.num_prefixes

    @property
    def n_weight_heads(self) -> int:
        return self.S * self.P


def _check_embeddings(op: str, layout: LinearLayout, h) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{op}: embeddings must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: embeddings must be float16, bfloat16, float32 or float64, got {h.dtype}")
    K, D = layout.num_prefixes, layout.d_sim
    if h.dim() != 3 or h.shape[-1] != D or h.shape[1] < K:
        raise ValueError(f"{op}: embeddings must have shape (B, K + T, d_sim) with K={K} prefix rows "
                         f"and d_sim={D}, got {tuple(h.shape)}")


# --------------------------------------------------------------------------------------------
# pack / unpack / embed
# --------------------------------------------------------------------------------------------
def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, layout: LinearLayout) -> torch.Tensor:
    """Write W, b into K prefix rows (TinT's "stacking", arXiv 2307.01189 §2.3).

    Args:
        weight: W, (dout, din) or (B, dout, din); any float dtype.
        bias: b, (dout,) or (B, dout) matching weight's batch, or None (zeros).
        layout: the LinearLayout.
    Returns:
        prefixes (K, d_sim) or (B, K, d_sim), weight's dtype and device: prefix j holds rows
        S·j … S·j+S−1 of W row-major in [0, S·din), then b in [S·din, S·din+dout) (every prefix
        holds a copy of b; only prefix 0's is read or updated); zeros elsewhere.
    Raises:
        TypeError / ValueError: not tensors, not floating, or shapes do not match the layout.
    """
    op = "pack_linear"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: weight must be a floating tensor, got {weight.dtype}")
    din, dout, K, D, S = layout.din, layout.dout, layout.num_prefixes, layout.d_sim, layout.S
    if weight.dim() not in (2, 3) or tuple(weight.shape[-2:]) != (dout, din):
        raise ValueError(f"{op}: weight must have shape (dout, din) = ({dout}, {din}) or (B, {dout}, {din}), "
                         f"got {tuple(weight.shape)}")
    batch = tuple(weight.shape[:-2])
    if bias is None:
        bias = weight.new_zeros(*batch, dout)
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != batch + (dout,):
        raise ValueError(f"{op}: bias must have shape {batch + (dout,)} to match weight "
                         f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    w_rows = weight.reshape(*batch, K, S * din)
    b_rows = bias.to(weight.dtype).unsqueeze(-2).expand(*batch, K, dout)
    pad = weight.new_zeros(*batch, K, D - S * din - dout)
    return torch.cat([w_rows, b_rows, pad], dim=-1)


def unpack_linear(prefixes: torch.Tensor, layout: LinearLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Read W, b back from prefix rows (inverse of ``pack_linear``; b from prefix 0).

    Args:
        prefixes: (K, d_sim), (B, K, d_sim), or full embeddings (B, K + T, d_sim) (the first K rows
            are read).
        layout: the LinearLayout.
    Returns:
        (W, b): (dout, din) and (dout,), or (B, dout, din) and (B, dout); prefixes' dtype.
    Raises:
        TypeError / ValueError: not a tensor, or fewer than K rows / wrong width.
    """
    op = "unpack_linear"
    if not isinstance(prefixes, torch.Tensor):
        raise TypeError(f"{op}: prefixes must be a torch.Tensor, got {type(prefixes).__name__}")
    din, dout, K, D, S = layout.din, layout.dout, layout.num_prefixes, layout.d_sim, layout.S
    if prefixes.dim() not in (2, 3) or prefixes.shape[-1] != D or prefixes.shape[-2] < K:
        raise ValueError(f"{op}: prefixes must have shape (K, d_sim) = ({K}, {D}) or (B, >= {K}, {D}), "
                         f"got {tuple(prefixes.shape)}")
    pre = prefixes[..., :K, :]
    weight = pre[..., :S * din].reshape(*pre.shape[:-2], dout, din)
    bias = pre[..., 0, S * din:S * din + dout]
    return weight, bias


def embed(x: torch.Tensor, prefixes: torch.Tensor, layout: LinearLayout) -> torch.Tensor:
    """Build TinT embeddings (B, K + T, d_sim): prefix rows, then token rows holding x_t in [0, din).

    Args:
        x: (B, T, din) auxiliary inputs (T may be 0).
        prefixes: (K, d_sim) (shared by every sample) or (B, K, d_sim), x's dtype and device.
        layout: the LinearLayout.
    Returns:
        (B, K + T, d_sim) in x's dtype.
    Raises:
        TypeError / ValueError: shapes, dtypes or devices do not match.
    """
    op = "embed"
    for name, t in (("x", x), ("prefixes", prefixes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    din, K, D = layout.din, layout.num_prefixes, layout.d_sim
    if x.dim() != 3 or x.shape[-1] != din:
        raise ValueError(f"{op}: x must have shape (B, T, din) with din={din}, got {tuple(x.shape)}")
    B = x.shape[0]
    if prefixes.dim() == 2:
        prefixes = prefixes.unsqueeze(0).expand(B, -1, -1)
    if tuple(prefixes.shape) != (B, K, D):
        raise ValueError(f"{op}: prefixes must have shape (K, d_sim) = ({K}, {D}) or (B, K, d_sim) = "
                         f"({B}, {K}, {D}), got {tuple(prefixes.shape)}")
    if prefixes.dtype != x.dtype or prefixes.device != x.device:
        raise ValueError(f"{op}: prefixes ({prefixes.dtype}, {prefixes.device}) and x ({x.dtype}, "
                         f"{x.device}) must share dtype and device")
    tok = torch.cat([x, x.new_zeros(B, x.shape[1], D - din)], dim=-1)
    return torch.cat([prefixes, tok], dim=1)


def set_token_signal(h: torch.Tensor, signal: torch.Tensor, layout: LinearLayout) -> torch.Tensor:
    """Return a copy of embeddings ``h`` whose token rows hold ``signal`` in [0, width) (e.g. dy_t
    before Linear Backward / Descent); prefix rows and the rest of each token row are kept.

    Args:
        h: (B, K + T, d_sim). signal: (B, T, width), width ≤ memory_index, h's dtype / device.
    Raises:
        ValueError: shapes do not match, or the signal would overwrite the memory slot.
    """
    op = "set_token_signal"
    _check_embeddings(op, layout, h)
    K = layout.num_prefixes
    B, T = h.shape[0], h.shape[1] - K
    if not isinstance(signal, torch.Tensor) or signal.dim() != 3 or tuple(signal.shape[:2]) != (B, T):
        raise ValueError(f"{op}: signal must be a tensor of shape (B, T, width) = ({B}, {T}, width), got "
                         f"{tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__}")
    w = signal.shape[-1]
    if w > layout.memory_index:
        raise ValueError(f"{op}: signal width {w} would overwrite the memory slot at {layout.memory_index}")
    tok = torch.cat([signal.to(h.dtype), h[:, K:, w:]], dim=-1)
    return torch.cat([h[:, :K], tok], dim=1)


# --------------------------------------------------------------------------------------------
# The fixed H_sim-split weights (0/1 patterns; built once, cast to the input dtype per call)
# --------------------------------------------------------------------------------------------
def _grid_of_natural(S: int, K: int) -> torch.Tensor:
    """gidx[i] = grid coordinate holding natural output row i = S·j + r, i.e. r·K + j."""
    i = torch.arange(S * K)
    return (i % S) * K + i // S


def _head_pairs(S: int, P: int):
    """(r, m, r·P + m) flattened over r < S, m < P."""
    r = torch.arange(S).repeat_interleave(P)
    m = torch.arange(P).repeat(S)
    return r, m, r * P + m


class _SimLinearBase(nn.Module):
    def __init__(self, din: int, dout: int, *, d_sim: int, num_prefixes: int,
                 memory_index: int | None = None, backend: str | None = None):
        super().__init__()
        self.layout = LinearLayout(din, dout, d_sim, num_prefixes, memory_index)
        self.backend = backend
        L = self.layout
        K, H, S, P = L.num_prefixes, L.H, L.S, L.P
        self._r, self._m, self._rm = _head_pairs(S, P)
        # weight-head identity (H_sim-split block map): passes a prefix's weight shards, drops the rest
        wid = torch.zeros(H, K, K)
        wid[: L.n_weight_heads] = torch.eye(K)
        self.register_buffer("weight_heads_block", wid, persistent=False)
        # dout-wide heads for the fixed row permutation, when d_sim splits into them (else a gather)
        self._perm_hsim = L.d_sim % L.dout == 0
        gidx = _grid_of_natural(S, K)
        self.register_buffer("grid_of_natural", gidx, persistent=False)
        self.register_buffer("natural_of_grid", torch.argsort(gidx), persistent=False)
        if self._perm_hsim:
            # natural → grid permutation as an H_sim-split block map on chunk 0 (dy's reordering for
            # Linear Backward's query / Linear Descent's key); other chunks dropped
            H2 = L.d_sim // L.dout
            blk = torch.zeros(H2, L.dout, L.dout)
            blk[0, self.natural_of_grid, torch.arange(L.dout)] = 1.0  # y[g] = z[nat(g)]
            self.register_buffer("to_grid_block", blk, persistent=False)

    def _hsim(self, x, mix=None, block=None):
        c = lambda w: None if w is None else w.to(dtype=x.dtype, device=x.device)  # noqa: E731
        return hsim_split_linear(x, c(mix), None, c(block), None, backend=self.backend)

    def _natural_to_grid(self, tok: torch.Tensor) -> torch.Tensor:
        """Token rows' [0, dout) reordered so coordinate r·K + j holds row S·j + r; zeros elsewhere."""
        L = self.layout
        if self._perm_hsim:
            return self._hsim(tok, block=self.to_grid_block)
        g = tok[..., :L.dout][..., self.natural_of_grid]
        return torch.cat([g, tok.new_zeros(*tok.shape[:-1], L.d_sim - L.dout)], dim=-1)

    def _assemble_tokens(self, head: torch.Tensor, width: int, x_mem: torch.Tensor) -> torch.Tensor:
        """Token rows [head[:width], 0 …, x_mem in [mem, mem+din), 0 …]."""
        L = self.layout
        mem = L.memory_index
        z = lambda n: head.new_zeros(*head.shape[:-1], n)  # noqa: E731
        return torch.cat([head[..., :width], z(mem - width), x_mem, z(L.d_sim - mem - L.din)], dim=-1)

    def extra_repr(self) -> str:
        L = self.layout
        return (f"din={L.din}, dout={L.dout}, d_sim={L.d_sim}, num_prefixes={L.num_prefixes}, "
                f"memory_index={L.memory_index}")


class LinearForward(_SimLinearBase):
    """Simulated Linear Forward: token rows get y_t = W x_t + b (arXiv 2307.01189 §4.1, Fig. 2).

    Args (constructor): din, dout, d_sim, num_prefixes, memory_index — see ``LinearLayout``;
        backend: passed to ``tntkernels.hsim_split_linear`` (None = best available).
    forward(h):
        h: (B, K + T, d_sim) float16/bfloat16/float32/float64; prefix rows hold W, b (``pack_linear``),
           token rows hold x_t in [0, din).
        Returns (B, K + T, d_sim), h's dtype: prefix rows unchanged; token rows hold y_t in
        [0, dout), x_t in the memory slot [mem, mem + din) and zeros elsewhere.
    Raises:
        TypeError / ValueError: h is not a floating tensor of shape (B, K + T, d_sim).
    """

    def __init__(self, din, dout, *, d_sim, num_prefixes, memory_index=None, backend=None):
        super().__init__(din, dout, d_sim=d_sim, num_prefixes=num_prefixes,
                         memory_index=memory_index, backend=backend)
        L = self.layout
        K, H, S, NW = L.num_prefixes, L.H, L.S, L.n_weight_heads
        # query mix: head (r, m) ← head m (shard m of x_t), for every r
        q = torch.zeros(K, H, H)
        q[:, self._m, self._rm] = 1.0
        self.register_buffer("query_mix", q, persistent=False)
        # output mix: head r ← Σ_m head (r, m) (partial dot products → y in grid order);
        # head S + s ← bias head NW + s (b in natural order, in [dout, 2·dout))
        o = torch.zeros(K, H, H)
        o[:, self._rm, self._r] = 1.0
        o[:, NW + torch.arange(S), S + torch.arange(S)] = 1.0
        self.register_buffer("out_mix", o, persistent=False)
        if self._perm_hsim:
            # permutation (block, dout-wide heads): chunk 0 grid → natural, chunk 1 (b) kept; then the
            # bias-add mix: chunk 0 ← chunk 0 + chunk 1, every other chunk dropped
            H2 = L.d_sim // L.dout
            pb = torch.zeros(H2, L.dout, L.dout)
            pb[0, self.grid_of_natural, torch.arange(L.dout)] = 1.0  # y[i] = z[grid(i)]
            pb[1] = torch.eye(L.dout)
            bm = torch.zeros(L.dout, H2, H2)
            bm[:, 0, 0] = 1.0
            bm[:, 1, 0] = 1.0
            self.register_buffer("perm_block", pb, persistent=False)
            self.register_buffer("bias_add_mix", bm, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        L = self.layout
        _check_embeddings("LinearForward", L, h)
        K, H, S, NW, dout = L.num_prefixes, L.H, L.S, L.n_weight_heads, L.dout
        B, T = h.shape[0], h.shape[1] - K
        pre, tok = h[:, :K], h[:, K:]
        q = self._hsim(tok, mix=self.query_mix).view(B, T, H, K)[:, :, :NW]
        k = self._hsim(pre, block=self.weight_heads_block).view(B, K, H, K)[:, :, :NW]
        # no-softmax attention, token t → prefix j, head (r, m); value = one-hot e_j, so the head's
        # output vector is the score row itself: <x_t[m], W[S·j + r][m]> for j < K
        heads_w = torch.einsum("bthc,bjhc->bthj", q, k)
        # bias heads: position score 1 on prefix 0 only; value = identity → prefix 0's b
        heads_b = pre[:, 0].view(B, 1, H, K)[:, :, NW:NW + S].expand(B, T, S, K)
        att = torch.cat([heads_w, heads_b, tok.new_zeros(B, T, H - NW - S, K)], dim=2).reshape(B, T, L.d_sim)
        z = self._hsim(att, mix=self.out_mix)  # [0, dout): y - b in grid order; [dout, 2·dout): b
        if self._perm_hsim:
            y = self._hsim(self._hsim(z, block=self.perm_block), mix=self.bias_add_mix)
        else:
            y = z[..., :dout][..., self.grid_of_natural] + z[..., dout:2 * dout]
        out_tok = self._assemble_tokens(y, dout, tok[..., :L.din])
        return torch.cat([pre, out_tok], dim=1)


class LinearBackward(_SimLinearBase):
    """Simulated Linear Backward: token rows get dx_t = Wᵀ dy_t with the current (pre-update) W in
    the prefixes (arXiv 2307.01189 §4.1, Fig. 4).

    Args (constructor): as ``LinearForward``.
    forward(h):
        h: (B, K + T, d_sim); prefix rows hold W (``pack_linear``); token rows hold dy_t in [0, dout)
           and x_t in the memory slot [mem, mem + din) (as left by LinearForward).
        Returns (B, K + T, d_sim), h's dtype: prefix rows unchanged; token rows hold dx_t in
        [0, din), the memory slot kept, zeros elsewhere.
    Raises:
        TypeError / ValueError: h is not a floating tensor of shape (B, K + T, d_sim).
    """

    def __init__(self, din, dout, *, d_sim, num_prefixes, memory_index=None, backend=None):
        super().__init__(din, dout, d_sim=d_sim, num_prefixes=num_prefixes,
                         memory_index=memory_index, backend=backend)
        L = self.layout
        K, H = L.num_prefixes, L.H
        # query mix: head (r, m) ← head r of the grid-ordered dy (coordinate j = dy[S·j + r])
        q = torch.zeros(K, H, H)
        q[:, self._r, self._rm] = 1.0
        self.register_buffer("query_mix", q, persistent=False)
        # output mix: head m ← Σ_r head (r, m)  (dx in natural order in [0, din))
        o = torch.zeros(K, H, H)
        o[:, self._rm, self._m] = 1.0
        self.register_buffer("out_mix", o, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        L = self.layout
        _check_embeddings("LinearBackward", L, h)
        out_tok = self._dx_tokens(h)
        return torch.cat([h[:, :L.num_prefixes], out_tok], dim=1)

    def _dx_tokens(self, h):
        L = self.layout
        K, H, NW, mem = L.num_prefixes, L.H, L.n_weight_heads, L.memory_index
        B, T = h.shape[0], h.shape[1] - K
        pre, tok = h[:, :K], h[:, K:]
        q = self._hsim(self._natural_to_grid(tok), mix=self.query_mix).view(B, T, H, K)[:, :, :NW]
        v = self._hsim(pre, block=self.weight_heads_block).view(B, K, H, K)[:, :, :NW]
        # key = prefix one-hot e_j, so the score of token t on prefix j in head (r, m) is q[..., j]
        heads = torch.cat([torch.einsum("bthj,bjhc->bthc", q, v),
                           tok.new_zeros(B, T, H - NW, K)], dim=2).reshape(B, T, L.d_sim)
        dx = self._hsim(heads, mix=self.out_mix)
        return self._assemble_tokens(dx, L.din, tok[..., mem:mem + L.din])


class LinearDescent(_SimLinearBase):
    """Simulated Linear Descent: per sample, W ← W − η Σ_{t∈train} dy_t x_tᵀ and
    b ← b − η Σ_{t∈train} dy_t (sums, not means) in the prefix rows (arXiv 2307.01189 §4.1, Fig. 5).

    Args (constructor): as ``LinearForward`` plus lr: η (a finite float; the learning rate, in units
        of the loss gradient).
    forward(h, train_mask=None):
        h: (B, K + T, d_sim); prefix rows hold W, b; token rows hold dy_t in [0, dout) and x_t in the
           memory slot [mem, mem + din).
        train_mask: (B, T) 0/1 (bool or float) selecting the training tokens; None = all tokens.
        Returns (B, K + T, d_sim), h's dtype: each sample's prefix rows hold its updated W (all
        prefixes) and updated b (prefix 0 only; other prefixes' copies of b untouched); token rows
        unchanged.
    Raises:
        TypeError / ValueError: h is not a floating (B, K + T, d_sim) tensor; train_mask is not (B, T);
            lr is not finite.
    """

    def __init__(self, din, dout, *, d_sim, num_prefixes, lr, memory_index=None, backend=None):
        super().__init__(din, dout, d_sim=d_sim, num_prefixes=num_prefixes,
                         memory_index=memory_index, backend=backend)
        lr = float(lr)
        if not math.isfinite(lr):
            raise ValueError(f"LinearDescent: lr must be a finite float, got {lr}")
        self.lr = lr
        L = self.layout
        K, H, S, NW = L.num_prefixes, L.H, L.S, L.n_weight_heads
        # key mix: head (r, m) ← head r of the grid-ordered dy
        km = torch.zeros(K, H, H)
        km[:, self._r, self._rm] = 1.0
        self.register_buffer("key_mix", km, persistent=False)
        # value mix (scaled by −η per call): head (r, m) ← memory head mem/K + m (shard m of x_t);
        # bias head NW + s ← head s (shard s of dy_t)
        vm = torch.zeros(K, H, H)
        vm[:, L.memory_index // K + self._m, self._rm] = 1.0
        vm[:, torch.arange(S), NW + torch.arange(S)] = 1.0
        self.register_buffer("value_mix", vm, persistent=False)

    def forward(self, h: torch.Tensor, train_mask: torch.Tensor | None = None) -> torch.Tensor:
        L = self.layout
        _check_embeddings("LinearDescent", L, h)
        pre_new = self._updated_prefixes(h, train_mask)
        return torch.cat([pre_new, h[:, L.num_prefixes:]], dim=1)

    def _updated_prefixes(self, h, train_mask):
        L = self.layout
        K, H, S, NW = L.num_prefixes, L.H, L.S, L.n_weight_heads
        B, T = h.shape[0], h.shape[1] - K
        pre, tok = h[:, :K], h[:, K:]
        if train_mask is None:
            mask = tok.new_ones(B, T)
        else:
            if not isinstance(train_mask, torch.Tensor):
                raise TypeError(f"LinearDescent: train_mask must be a torch.Tensor or None, "
                                f"got {type(train_mask).__name__}")
            if tuple(train_mask.shape) != (B, T):
                raise ValueError(f"LinearDescent: train_mask must have shape (B, T) = ({B}, {T}), "
                                 f"got {tuple(train_mask.shape)}")
            mask = train_mask.to(dtype=h.dtype, device=h.device)
        key = self._hsim(self._natural_to_grid(tok), mix=self.key_mix).view(B, T, H, K)[:, :, :NW]
        val = (self._hsim(tok, mix=self.value_mix) * (-self.lr)).view(B, T, H, K)
        # prefix j attends token t (masked to the training segment); query = prefix one-hot e_j, so the
        # score in head (r, m) is key[..., j] = dy_t[S·j + r]; the head output lands on the stored shard
        upd_w = torch.einsum("bthj,bthc->bjhc", key * mask[:, :, None, None], val[:, :, :NW])
        # bias heads: key e_0 on every token, so only prefix 0 scores (1 on each training token)
        upd_b = torch.einsum("bt,bthc->bhc", mask, val[:, :, NW:NW + S])
        upd_b = torch.cat([upd_b.unsqueeze(1), upd_b.new_zeros(B, K - 1, S, K)], dim=1)
        upd = torch.cat([upd_w, upd_b, pre.new_zeros(B, K, H - NW - S, K)], dim=2).reshape(B, K, L.d_sim)
        return pre + upd  # residual: prefixes get input + change


class LinearDescentBackward(LinearDescent):
    """TinT's ``Linear_Descent_Backward``: Linear Descent and Linear Backward run in parallel on the
    same input (so the backward uses the pre-update W); prefix rows come from the descent, token
    rows from the backward (arXiv 2307.01189 Fig. 1).

    Args (constructor): as ``LinearDescent``.
    forward(h, train_mask=None): h, train_mask as ``LinearDescent``. Returns (B, K + T, d_sim):
        prefix rows = updated W, b; token rows = dx_t in [0, din), memory slot kept.
    Raises: as ``LinearDescent``.
    """

    def __init__(self, din, dout, *, d_sim, num_prefixes, lr, memory_index=None, backend=None):
        super().__init__(din, dout, d_sim=d_sim, num_prefixes=num_prefixes, lr=lr,
                         memory_index=memory_index, backend=backend)
        self.backward_module = LinearBackward(din, dout, d_sim=d_sim, num_prefixes=num_prefixes,
                                              memory_index=self.layout.memory_index, backend=backend)

    def forward(self, h: torch.Tensor, train_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_embeddings("LinearDescentBackward", self.layout, h)
        pre_new = self._updated_prefixes(h, train_mask)
        return torch.cat([pre_new, self.backward_module._dx_tokens(h)], dim=1)

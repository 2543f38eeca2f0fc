"""The fused TNT inner (word-level) sub-block: one Triton kernel per group of sentences.

    y = x1 + s_mlp · fc2(GELU(fc1(LN_mlp(x1)))),   x1 = x + s_attn · proj(MHA(LN_in(x)))

over the m words of each of S sentences (Han et al. 2021, TNT, Eq. 4-5; timm `tnt.Block`, lines
`pixel_embed + drop_path(attn_in(norm_in(·)))` and `+ drop_path(mlp_in(norm_mlp_in(·)))`). s_attn and
s_mlp are optional per-sentence drop-path scales (mask / keep_prob, as DropPath draws them).

This file holds the reference `inner_block_ref`, the Triton forward and backward kernels, their
launchers, the custom ops `tntkernels::inner_block_triton[_backward]` (fake kernels, autograd) and the
public `inner_block`. The forward kernel keeps a group of sentences (BLOCK_R rows = whole sentences)
in registers from the load of x to the store of y; the backward kernel recomputes that forward and
accumulates every weight gradient in registers over the groups a program visits, then writes one
fp32 partial per program, summed by `torch.sum` afterwards: no atomics, bitwise deterministic.

Heads are picked out of the (rows, C) q / k / v tiles with 0/1 selection matrices E_h (C × head_dim)
through `tl.dot`, which is exact, so the projections stay full-width GEMM tiles.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .. import _backend
from ._checks import check_tensor

# timm TNT Block names of the inner sub-block's parameters, in the order the kernels take them.
PARAM_NAMES = (
    "norm_in.weight", "norm_in.bias",
    "attn_in.qk.weight", "attn_in.qk.bias", "attn_in.v.weight", "attn_in.v.bias",
    "attn_in.proj.weight", "attn_in.proj.bias",
    "norm_mlp_in.weight", "norm_mlp_in.bias",
    "mlp_in.fc1.weight", "mlp_in.fc1.bias", "mlp_in.fc2.weight", "mlp_in.fc2.bias",
)
OPTIONAL_PARAMS = ("attn_in.qk.bias", "attn_in.v.bias")  # TNT: qkv_bias=False
# the kernels' pointer arguments for those parameters, same order; LayerNorm ones are float32
_PARAM_POINTERS = ("LN1W", "LN1B", "QKW", "QKB", "VW", "VB", "PW", "PB", "LN2W", "LN2B", "W1", "B1", "W2", "B2")
_LN_PARAMS = ("norm_in.weight", "norm_in.bias", "norm_mlp_in.weight", "norm_mlp_in.bias")
_LN_POINTERS = ("LN1W", "LN1B", "LN2W", "LN2B")

MAX_FUSED_DIM = 64  # C: a whole row of every tile sits in registers
MAX_FUSED_WORDS = 64  # m
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param_shapes(C: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "norm_in.weight": (C,), "norm_in.bias": (C,),
        "attn_in.qk.weight": (2 * C, C), "attn_in.qk.bias": (2 * C,),
        "attn_in.v.weight": (C, C), "attn_in.v.bias": (C,),
        "attn_in.proj.weight": (C, C), "attn_in.proj.bias": (C,),
        "norm_mlp_in.weight": (C,), "norm_mlp_in.bias": (C,),
        "mlp_in.fc1.weight": (hidden, C), "mlp_in.fc1.bias": (hidden,),
        "mlp_in.fc2.weight": (C, hidden), "mlp_in.fc2.bias": (C,),
    }


def _eps_pair(eps) -> tuple[float, float]:
    pair = isinstance(eps, (tuple, list))
    if pair and len(eps) != 2:
        raise ValueError(f"inner_block: eps must be one float or a pair (eps_in, eps_mlp), got {len(eps)} values")
    try:
        values = tuple(eps) if pair else (eps, eps)
        if any(isinstance(e, (str, bytes)) for e in values):
            raise TypeError
        eps_in, eps_mlp = (float(e) for e in values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"inner_block: eps must be a float or a pair of floats (eps_in, eps_mlp), "
                        f"got {eps!r}") from None
    for e in (eps_in, eps_mlp):
        if not (e > 0 and e != float("inf")):
            raise ValueError(f"inner_block: LayerNorm eps must be a positive finite float, got {eps!r}")
    return eps_in, eps_mlp


def inner_block_ref(x: torch.Tensor, params: Mapping[str, torch.Tensor | None], *, num_heads: int,
                    eps: float | tuple[float, float] = 1e-5,
                    drop_path_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Reference TNT inner sub-block in plain PyTorch, computed as timm does (softmax in x's dtype).

    Args:
        x: (S, m, C) word tokens of S sentences, any floating dtype.
        params: timm names (`PARAM_NAMES`, relative to a TNT Block) → tensors in x's dtype;
            "attn_in.qk.bias" / "attn_in.v.bias" may be missing or None.
        num_heads: H; head_dim = C / H, scale head_dim ** -0.5.
        eps: LayerNorm eps, one float for both norms or (eps_in, eps_mlp).
        drop_path_scales: None or (s_attn, s_mlp), each (S,): per-sentence factor on each residual
            branch (DropPath's mask / keep_prob).
    Returns:
        (S, m, C) in x's dtype.
    """
    eps_in, eps_mlp = _eps_pair(eps)
    S, m, C = x.shape
    H = num_heads
    d = C // H
    p = params
    h = F.layer_norm(x, (C,), p["norm_in.weight"], p["norm_in.bias"], eps_in)
    q, k = F.linear(h, p["attn_in.qk.weight"], p.get("attn_in.qk.bias")).reshape(S, m, 2, H, d).permute(
        2, 0, 3, 1, 4).unbind(0)  # (S, H, m, d)
    v = F.linear(h, p["attn_in.v.weight"], p.get("attn_in.v.bias")).reshape(S, m, H, d).transpose(1, 2)
    o = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(dim=-1) @ v  # (S, H, m, d)
    a = F.linear(o.transpose(1, 2).reshape(S, m, C), p["attn_in.proj.weight"], p["attn_in.proj.bias"])
    if drop_path_scales is not None:
        a = a * drop_path_scales[0].to(a.dtype)[:, None, None]
    x = x + a
    h = F.layer_norm(x, (C,), p["norm_mlp_in.weight"], p["norm_mlp_in.bias"], eps_mlp)
    h = F.linear(F.gelu(F.linear(h, p["mlp_in.fc1.weight"], p["mlp_in.fc1.bias"])),
                 p["mlp_in.fc2.weight"], p["mlp_in.fc2.bias"])
    if drop_path_scales is not None:
        h = h * drop_path_scales[1].to(h.dtype)[:, None, None]
    return x + h


# ---------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------

def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def triton_config(m: int, C: int, head_dim: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_R forward, BLOCK_R backward, BLOCK_C, BLOCK_D, BLOCK_F, num_warps) for m words, width C
    and head_dim. A group is BLOCK_R // m whole sentences; the MLP hidden width may be up to
    BLOCK_F = 4 · BLOCK_C (timm's inner MLP is 4C).

    Chosen from the compiled kernels' resource usage (no GPU timing yet): for TNT-S (m 16, C 24,
    head_dim 6) in bf16 on sm_90, 8 warps keep the forward at 64 rows free of spills, and the
    backward, which carries every weight gradient in registers, spills least at 32 rows.
    """
    bc, bd = _block(C), _block(head_dim)
    br_fwd = max(_block(m), 64 if bc <= 32 else 32)
    br_bwd = max(_block(m), 32)
    return br_fwd, br_bwd, bc, bd, 4 * bc, 8


# (x dtype, compute dtype): x / y / dx keep the residual stream's dtype; parameters and tl.dot
# inputs use the compute dtype (under autocast: float32 stream, bfloat16 or float16 compute).
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float16), (torch.float32, torch.bfloat16))


def triton_configs() -> list[tuple[int, int, int, int, int, int, torch.dtype, torch.dtype]]:
    """Every (BLOCK_R fwd, BLOCK_R bwd, BLOCK_C, BLOCK_D, BLOCK_F, num_warps, x dtype, compute dtype)
    the launchers can choose for m, C <= 64; the tests compile each for sm_80 and sm_90."""
    tiles = set()
    for m in range(1, MAX_FUSED_WORDS + 1):
        for C in range(1, MAX_FUSED_DIM + 1):
            for d in range(1, C + 1):
                if C % d == 0:
                    tiles.add(triton_config(m, C, d))
    return [(*t, xd, cd) for t in sorted(tiles) for xd, cd in DTYPE_PAIRS]


if _backend.triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b):
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _load_mat(ptr, offs_rows, offs_cols, n_rows, n_cols, stride_row, dt):
        mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
        return tl.load(ptr + offs_rows[:, None] * stride_row + offs_cols[None, :], mask=mask, other=0.0).to(dt)

    @triton.jit
    def _load_vec(ptr, offs, n):
        return tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)

    @triton.jit
    def _layer_norm(x, w, b, c_ok, C, eps):
        """Row LayerNorm of an fp32 (rows, BLOCK_C) tile whose padded columns are 0.
        Returns (xhat, rstd, xhat·w + b); padded columns of xhat stay 0."""
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(c_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        xhat = xc * rstd[:, None]
        return xhat, rstd, xhat * w[None, :] + b[None, :]

    @triton.jit
    def _layer_norm_bwd(dxn, xhat, rstd, w, c_ok, C):
        dxhat = dxn * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / C
        c2 = tl.sum(dxhat, axis=1) / C
        return tl.where(c_ok[None, :], (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)

    @triton.jit
    def _gelu(h):
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(h):
        return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)

    @triton.jit
    def _head_select(h, offs_c, offs_d, D, dt):
        """E_h (BLOCK_C, BLOCK_D): E[c, j] = 1 where c = h·D + j, j < D."""
        hit = (offs_c[:, None] == h * D + offs_d[None, :]) & (offs_d[None, :] < D)
        return tl.where(hit, 1.0, 0.0).to(dt)

    @triton.jit
    def _softmax_probs(q_h, k_h, same, row_ok, scale):
        """Normalized attention probabilities (rows, rows) fp32; 0 outside a row's own sentence and
        on padded rows."""
        logits = _dot(q_h, tl.trans(k_h)) * scale
        logits = tl.where(same, logits, float("-inf"))
        row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
        p = tl.exp(logits - row_max[:, None])
        denom = tl.sum(p, axis=1)
        return p / tl.where(denom > 0, denom, 1.0)[:, None]

    @triton.jit
    def _group_rows(grp, spp, n_sent, M, sx_s, sx_m, BLOCK_R: tl.constexpr):
        """Row r of group grp is word r % M of sentence grp·spp + r // M."""
        offs_r = tl.arange(0, BLOCK_R)
        local = offs_r // M
        sent = local.to(tl.int64) + grp * spp  # grp · spp <= S + spp fits int32; offsets below are int64
        row_ok = (local < spp) & (sent < n_sent)
        row_off = sent * sx_s + (offs_r % M) * sx_m
        same = (local[:, None] == local[None, :]) & row_ok[None, :]
        return sent, row_ok, row_off, same

    @triton.jit
    def _poisoned_sentences(t, io_mask, same):
        """Per row of a group tile: does the row's sentence hold a NaN or ±Inf in t? The group's
        sentences share the attention GEMMs (P·v, dO·vᵀ, Pᵀ·dO, dS·k, dSᵀ·q), where a probability of
        0 times another sentence's NaN is NaN: the kernels run the attention of a poisoned sentence
        on zeros and write NaN for its result instead, as the reference's whole sentence is NaN."""
        bad = io_mask & ((t != t) | (tl.abs(t) == float("inf")))
        row_bad = tl.max(bad.to(tl.int32), axis=1)
        return tl.max(tl.where(same, row_bad[None, :], 0), axis=1) > 0

    @triton.jit
    def _inner_block_fwd_kernel(
        X, Y, LN1W, LN1B, QKW, QKB, VW, VB, PW, PB, LN2W, LN2B, W1, B1, W2, B2, SA, SM,
        sx_s, sx_m, sx_c, sy_s, sy_m,
        n_sent, spp, M, C, H, D, HID, eps1, eps2, scale,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        dt = QKW.dtype.element_ty
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        offs_f = tl.arange(0, BLOCK_F)
        c_ok = offs_c < C
        sent, row_ok, row_off, same = _group_rows(tl.program_id(0), spp, n_sent, M, sx_s, sx_m, BLOCK_R)
        io_mask = row_ok[:, None] & c_ok[None, :]
        x = tl.load(X + row_off[:, None] + offs_c[None, :] * sx_c, mask=io_mask, other=0.0).to(tl.float32)
        # attention branch
        _, _, xn = _layer_norm(x, _load_vec(LN1W, offs_c, C), _load_vec(LN1B, offs_c, C), c_ok, C, eps1)
        xn = xn.to(dt)
        wq = _load_mat(QKW, offs_c, offs_c, C, C, C, dt)
        wk = _load_mat(QKW + C * C, offs_c, offs_c, C, C, C, dt)
        wv = _load_mat(VW, offs_c, offs_c, C, C, C, dt)
        q = (_dot(xn, tl.trans(wq)) + _load_vec(QKB, offs_c, C)[None, :]).to(dt)
        k = (_dot(xn, tl.trans(wk)) + _load_vec(QKB + C, offs_c, C)[None, :]).to(dt)
        v = (_dot(xn, tl.trans(wv)) + _load_vec(VB, offs_c, C)[None, :]).to(dt)
        poisoned = (_poisoned_sentences(q, io_mask, same) | _poisoned_sentences(k, io_mask, same)
                    | _poisoned_sentences(v, io_mask, same))
        q = tl.where(poisoned[:, None], 0.0, q).to(dt)
        k = tl.where(poisoned[:, None], 0.0, k).to(dt)
        v = tl.where(poisoned[:, None], 0.0, v).to(dt)
        o = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for h in range(H):
            e = _head_select(h, offs_c, offs_d, D, dt)
            v_h = _dot(v, e).to(dt)
            p = _softmax_probs(_dot(q, e).to(dt), _dot(k, e).to(dt), same, row_ok, scale)
            o += _dot(_dot(p.to(dt), v_h).to(dt), tl.trans(e))
        o = tl.where(poisoned[:, None], float("nan"), o)
        wp = _load_mat(PW, offs_c, offs_c, C, C, C, dt)
        a = _dot(o.to(dt), tl.trans(wp)) + _load_vec(PB, offs_c, C)[None, :]
        s_attn = tl.load(SA + sent, mask=row_ok, other=0.0)
        x = x + s_attn[:, None] * a
        # MLP branch
        _, _, xn = _layer_norm(x, _load_vec(LN2W, offs_c, C), _load_vec(LN2B, offs_c, C), c_ok, C, eps2)
        w1 = _load_mat(W1, offs_f, offs_c, HID, C, C, dt)  # (BLOCK_F, BLOCK_C)
        hid = _gelu(_dot(xn.to(dt), tl.trans(w1)) + _load_vec(B1, offs_f, HID)[None, :])
        w2 = _load_mat(W2, offs_c, offs_f, C, HID, HID, dt)  # (BLOCK_C, BLOCK_F)
        out = _dot(hid.to(dt), tl.trans(w2)) + _load_vec(B2, offs_c, C)[None, :]
        s_mlp = tl.load(SM + sent, mask=row_ok, other=0.0)
        y = x + s_mlp[:, None] * out
        y_off = sent * sy_s + (tl.arange(0, BLOCK_R) % M) * sy_m
        tl.store(Y + y_off[:, None] + offs_c[None, :], y.to(Y.dtype.element_ty), mask=io_mask)

    @triton.jit
    def _inner_block_bwd_kernel(
        X, dY, dX, LN1W, LN1B, QKW, QKB, VW, VB, PW, PB, LN2W, LN2B, W1, B1, W2, B2, SA, SM, Part,
        sx_s, sx_m, sx_c, sdy_s, sdy_m, sdy_c, sdx_s, sdx_m,
        n_sent, n_groups, spp, M, C, H, D, HID, eps1, eps2, scale, part_stride,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        dt = QKW.dtype.element_ty
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        offs_f = tl.arange(0, BLOCK_F)
        c_ok = offs_c < C
        ln1w = _load_vec(LN1W, offs_c, C)
        ln1b = _load_vec(LN1B, offs_c, C)
        ln2w = _load_vec(LN2W, offs_c, C)
        ln2b = _load_vec(LN2B, offs_c, C)
        wq = _load_mat(QKW, offs_c, offs_c, C, C, C, dt)
        wk = _load_mat(QKW + C * C, offs_c, offs_c, C, C, C, dt)
        wv = _load_mat(VW, offs_c, offs_c, C, C, C, dt)
        wp = _load_mat(PW, offs_c, offs_c, C, C, C, dt)
        w1 = _load_mat(W1, offs_f, offs_c, HID, C, C, dt)  # (BLOCK_F, BLOCK_C)
        w2 = _load_mat(W2, offs_c, offs_f, C, HID, HID, dt)  # (BLOCK_C, BLOCK_F)
        bq = _load_vec(QKB, offs_c, C)
        bk = _load_vec(QKB + C, offs_c, C)
        bv = _load_vec(VB, offs_c, C)
        bp = _load_vec(PB, offs_c, C)
        b1 = _load_vec(B1, offs_f, HID)
        b2 = _load_vec(B2, offs_c, C)
        # weight-gradient accumulators, fp32, carried across this program's groups
        dwq = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        dwk = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        dwv = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        dwp = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        dw1 = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
        dw2 = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
        dbq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dbk = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dbv = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dbp = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db1 = tl.zeros((BLOCK_F,), dtype=tl.float32)
        db2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dln1w = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dln1b = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dln2w = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dln2b = tl.zeros((BLOCK_C,), dtype=tl.float32)
        pid = tl.program_id(0)
        for grp in range(pid, n_groups, tl.num_programs(0)):
            sent, row_ok, row_off, same = _group_rows(grp, spp, n_sent, M, sx_s, sx_m, BLOCK_R)
            io_mask = row_ok[:, None] & c_ok[None, :]
            word = tl.arange(0, BLOCK_R) % M
            x = tl.load(X + row_off[:, None] + offs_c[None, :] * sx_c, mask=io_mask, other=0.0).to(tl.float32)
            s_attn = tl.load(SA + sent, mask=row_ok, other=0.0)
            s_mlp = tl.load(SM + sent, mask=row_ok, other=0.0)
            # ---- recompute the forward
            xhat1, rstd1, xn1 = _layer_norm(x, ln1w, ln1b, c_ok, C, eps1)
            xn1 = xn1.to(dt)
            q = (_dot(xn1, tl.trans(wq)) + bq[None, :]).to(dt)
            k = (_dot(xn1, tl.trans(wk)) + bk[None, :]).to(dt)
            v = (_dot(xn1, tl.trans(wv)) + bv[None, :]).to(dt)
            poisoned = (_poisoned_sentences(q, io_mask, same) | _poisoned_sentences(k, io_mask, same)
                        | _poisoned_sentences(v, io_mask, same))
            q = tl.where(poisoned[:, None], 0.0, q).to(dt)
            k = tl.where(poisoned[:, None], 0.0, k).to(dt)
            v = tl.where(poisoned[:, None], 0.0, v).to(dt)
            o = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for h in range(H):
                e = _head_select(h, offs_c, offs_d, D, dt)
                p = _softmax_probs(_dot(q, e).to(dt), _dot(k, e).to(dt), same, row_ok, scale)
                o += _dot(_dot(p.to(dt), _dot(v, e).to(dt)).to(dt), tl.trans(e))
            o = tl.where(poisoned[:, None], float("nan"), o).to(dt)
            x1 = x + s_attn[:, None] * (_dot(o, tl.trans(wp)) + bp[None, :])
            xhat2, rstd2, xn2 = _layer_norm(x1, ln2w, ln2b, c_ok, C, eps2)
            xn2 = xn2.to(dt)
            hpre = _dot(xn2, tl.trans(w1)) + b1[None, :]  # (BLOCK_R, BLOCK_F)
            # ---- MLP branch backward
            dy = tl.load(dY + sent[:, None] * sdy_s + word[:, None] * sdy_m + offs_c[None, :] * sdy_c,
                         mask=io_mask, other=0.0).to(tl.float32)
            dout = dy * s_mlp[:, None]
            db2 += tl.sum(dout, axis=0)
            dout = dout.to(dt)
            dw2 += _dot(tl.trans(dout), _gelu(hpre).to(dt))
            dhpre = _dot(dout, w2) * _gelu_grad(hpre)  # (BLOCK_R, BLOCK_F)
            db1 += tl.sum(dhpre, axis=0)
            dhpre = dhpre.to(dt)
            dw1 += _dot(tl.trans(dhpre), xn2)
            dxn2 = _dot(dhpre, w1)  # (BLOCK_R, BLOCK_C)
            dln2w += tl.sum(dxn2 * xhat2, axis=0)
            dln2b += tl.sum(dxn2, axis=0)
            dx1 = dy + _layer_norm_bwd(dxn2, xhat2, rstd2, ln2w, c_ok, C)
            # ---- attention branch backward
            da = dx1 * s_attn[:, None]
            dbp += tl.sum(da, axis=0)
            da = da.to(dt)
            dwp += _dot(tl.trans(da), o)
            do = _dot(da, wp).to(dt)  # (BLOCK_R, BLOCK_C)
            poisoned = poisoned | _poisoned_sentences(do, io_mask, same)
            do = tl.where(poisoned[:, None], 0.0, do).to(dt)
            dq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            dk = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            dv = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for h in range(H):
                e = _head_select(h, offs_c, offs_d, D, dt)
                q_h = _dot(q, e).to(dt)
                k_h = _dot(k, e).to(dt)
                p = _softmax_probs(q_h, k_h, same, row_ok, scale)
                do_h = _dot(do, e).to(dt)
                dp = _dot(do_h, tl.trans(_dot(v, e).to(dt)))  # dO vᵀ (BLOCK_R, BLOCK_R)
                ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale
                ds = ds.to(dt)
                dv += _dot(_dot(tl.trans(p.to(dt)), do_h).to(dt), tl.trans(e))
                dq += _dot(_dot(ds, k_h).to(dt), tl.trans(e))
                dk += _dot(_dot(tl.trans(ds), q_h).to(dt), tl.trans(e))
            dq = tl.where(poisoned[:, None], float("nan"), dq)
            dk = tl.where(poisoned[:, None], float("nan"), dk)
            dv = tl.where(poisoned[:, None], float("nan"), dv)
            dbq += tl.sum(dq, axis=0)
            dbk += tl.sum(dk, axis=0)
            dbv += tl.sum(dv, axis=0)
            dq = dq.to(dt)
            dk = dk.to(dt)
            dv = dv.to(dt)
            dwq += _dot(tl.trans(dq), xn1)
            dwk += _dot(tl.trans(dk), xn1)
            dwv += _dot(tl.trans(dv), xn1)
            dxn1 = _dot(dq, wq) + _dot(dk, wk) + _dot(dv, wv)
            dln1w += tl.sum(dxn1 * xhat1, axis=0)
            dln1b += tl.sum(dxn1, axis=0)
            dx = dx1 + _layer_norm_bwd(dxn1, xhat1, rstd1, ln1w, c_ok, C)
            tl.store(dX + sent[:, None] * sdx_s + word[:, None] * sdx_m + offs_c[None, :],
                     dx.to(dX.dtype.element_ty), mask=io_mask)
        # ---- this program's partial weight gradients (layout: _partial_layout)
        base = Part + pid.to(tl.int64) * part_stride
        cc = (offs_c[:, None] < C) & (offs_c[None, :] < C)
        sq = offs_c[:, None] * C + offs_c[None, :]
        tl.store(base + sq, dwq, mask=cc)
        tl.store(base + C * C + sq, dwk, mask=cc)
        tl.store(base + 2 * C * C + sq, dwv, mask=cc)
        tl.store(base + 3 * C * C + sq, dwp, mask=cc)
        base = base + 4 * C * C
        tl.store(base + offs_f[:, None] * C + offs_c[None, :], dw1,
                 mask=(offs_f[:, None] < HID) & (offs_c[None, :] < C))
        base = base + HID * C
        tl.store(base + offs_c[:, None] * HID + offs_f[None, :], dw2,
                 mask=(offs_c[:, None] < C) & (offs_f[None, :] < HID))
        base = base + HID * C
        tl.store(base + offs_c, dbq, mask=c_ok)
        tl.store(base + C + offs_c, dbk, mask=c_ok)
        tl.store(base + 2 * C + offs_c, dbv, mask=c_ok)
        tl.store(base + 3 * C + offs_c, dbp, mask=c_ok)
        tl.store(base + 4 * C + offs_f, db1, mask=offs_f < HID)
        base = base + 4 * C + HID
        tl.store(base + offs_c, db2, mask=c_ok)
        tl.store(base + C + offs_c, dln1w, mask=c_ok)
        tl.store(base + 2 * C + offs_c, dln1b, mask=c_ok)
        tl.store(base + 3 * C + offs_c, dln2w, mask=c_ok)
        tl.store(base + 4 * C + offs_c, dln2b, mask=c_ok)


def _partial_layout(C: int, hid: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """(parameter, offset, shape) of each gradient in a row of the backward kernel's fp32 partials."""
    pieces = [("attn_in.qk.weight", (2 * C, C)), ("attn_in.v.weight", (C, C)), ("attn_in.proj.weight", (C, C)),
              ("mlp_in.fc1.weight", (hid, C)), ("mlp_in.fc2.weight", (C, hid)),
              ("attn_in.qk.bias", (2 * C,)), ("attn_in.v.bias", (C,)), ("attn_in.proj.bias", (C,)),
              ("mlp_in.fc1.bias", (hid,)), ("mlp_in.fc2.bias", (C,)),
              ("norm_in.weight", (C,)), ("norm_in.bias", (C,)), ("norm_mlp_in.weight", (C,)),
              ("norm_mlp_in.bias", (C,))]
    layout, offset = [], 0
    for name, shape in pieces:
        layout.append((name, offset, shape))
        offset += int(torch.Size(shape).numel())
    return layout


def _partial_size(C: int, hid: int) -> int:
    _, offset, shape = _partial_layout(C, hid)[-1]
    return offset + int(torch.Size(shape).numel())


_BWD_PARTIAL_BYTES = 64 << 20  # cap on the fp32 partials: programs × row size


def _bwd_programs(n_groups: int, C: int, hid: int, device: torch.device) -> int:
    """Programs of the backward kernel: enough to fill the GPU (4 per SM), each looping over groups;
    a fixed number per device, so results are bitwise repeatable. Under the interpreter: 3."""
    if device.type == "cuda":
        want = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        want = 3
    cap = max(1, _BWD_PARTIAL_BYTES // (4 * _partial_size(C, hid)))
    return max(1, min(n_groups, want, cap))


def _geometry(x: torch.Tensor, params: list[torch.Tensor], num_heads: int, backward: bool):
    """Shapes and the tile configuration of one launch; spp = sentences per group."""
    S, m, C = x.shape
    hid = params[PARAM_NAMES.index("mlp_in.fc1.weight")].shape[0]
    d = C // num_heads
    br_fwd, br_bwd, bc, bd, bf, warps = triton_config(m, C, d)
    br = br_bwd if backward else br_fwd
    spp = br // m
    return S, m, C, hid, d, br, bc, bd, bf, warps, spp, -(-S // spp)


def inner_block_forward(x: torch.Tensor, params: list[torch.Tensor], attn_scale: torch.Tensor,
                        mlp_scale: torch.Tensor, num_heads: int, eps_in: float, eps_mlp: float) -> torch.Tensor:
    """Triton forward. x (S, m, C) any strides; params: the 14 tensors of PARAM_NAMES, contiguous,
    LayerNorm ones float32, the others in the compute dtype (biases present); attn_scale,
    mlp_scale (S,) float32.
    Returns y (S, m, C) contiguous in x's dtype."""
    S, m, C, hid, d, br, bc, bd, bf, warps, spp, n_groups = _geometry(x, params, num_heads, backward=False)
    y = torch.empty((S, m, C), dtype=x.dtype, device=x.device)
    if S == 0 or m == 0:
        return y
    _inner_block_fwd_kernel[(n_groups,)](
        x, y, *params, attn_scale, mlp_scale, *x.stride(), *y.stride()[:2],
        S, spp, m, C, num_heads, d, hid, float(eps_in), float(eps_mlp), d ** -0.5,
        BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, BLOCK_F=bf, num_warps=warps)
    return y


def inner_block_backward(grad_y: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor],
                         attn_scale: torch.Tensor, mlp_scale: torch.Tensor, num_heads: int, eps_in: float,
                         eps_mlp: float) -> list[torch.Tensor]:
    """Triton backward (recomputes the forward). Returns [dx (x's dtype), d<param> for every name in
    PARAM_NAMES (each in its parameter's dtype)]; deterministic: per-program fp32 partials summed by torch.sum."""
    S, m, C, hid, d, br, bc, bd, bf, warps, spp, n_groups = _geometry(x, params, num_heads, backward=True)
    dx = torch.empty((S, m, C), dtype=x.dtype, device=x.device)
    if S == 0 or m == 0:
        return [dx] + [torch.zeros_like(p) for p in params]
    grad_y = grad_y.to(x.dtype)
    programs = _bwd_programs(n_groups, C, hid, x.device)
    row = _partial_size(C, hid)
    part = torch.empty((programs, row), dtype=torch.float32, device=x.device)
    _inner_block_bwd_kernel[(programs,)](
        x, grad_y, dx, *params, attn_scale, mlp_scale, part,
        *x.stride(), *grad_y.stride(), *dx.stride()[:2],
        S, n_groups, spp, m, C, num_heads, d, hid, float(eps_in), float(eps_mlp), d ** -0.5, row,
        BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, BLOCK_F=bf, num_warps=warps)
    total = part.sum(dim=0)
    grads = {name: total[off:off + int(torch.Size(shape).numel())].view(shape)
             for name, off, shape in _partial_layout(C, hid)}
    return [dx] + [grads[name].to(p.dtype, copy=True) for name, p in zip(PARAM_NAMES, params)]  # no aliasing


# ---------------------------------------------------------------------------------------------
# Custom ops (fake kernels for torch.compile, autograd) around the launchers
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tntkernels::inner_block_triton", mutates_args=())
def _inner_block_triton_op(x: torch.Tensor, params: list[torch.Tensor], attn_scale: torch.Tensor,
                           mlp_scale: torch.Tensor, num_heads: int, eps_in: float, eps_mlp: float) -> torch.Tensor:
    return inner_block_forward(x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp)


@_inner_block_triton_op.register_fake
def _inner_block_triton_fake(x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp):
    return x.new_empty(x.shape)


@torch.library.custom_op("tntkernels::inner_block_triton_backward", mutates_args=())
def _inner_block_triton_backward_op(grad_y: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor],
                                    attn_scale: torch.Tensor, mlp_scale: torch.Tensor, num_heads: int,
                                    eps_in: float, eps_mlp: float) -> list[torch.Tensor]:
    return inner_block_backward(grad_y, x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp)


@_inner_block_triton_backward_op.register_fake
def _inner_block_triton_backward_fake(grad_y, x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp):
    return [x.new_empty(x.shape)] + [p.new_empty(p.shape) for p in params]


def _setup_context(ctx, inputs, output):
    x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp = inputs
    ctx.save_for_backward(x, attn_scale, mlp_scale, *params)
    ctx.config = (num_heads, eps_in, eps_mlp)


def _backward(ctx, grad_y):
    x, attn_scale, mlp_scale, *params = ctx.saved_tensors
    num_heads, eps_in, eps_mlp = ctx.config
    if torch.is_grad_enabled():
        # create_graph=True (double backward): differentiate the reference instead, exactly.
        leaves = [x, *params]
        with torch.enable_grad():
            ref = inner_block_ref(x, dict(zip(PARAM_NAMES, params)), num_heads=num_heads,
                                  eps=(eps_in, eps_mlp), drop_path_scales=(attn_scale, mlp_scale))
        grads = torch.autograd.grad(ref, leaves, grad_y, create_graph=True, allow_unused=True)
        return grads[0], list(grads[1:]), None, None, None, None, None
    grads = _inner_block_triton_backward_op(grad_y, x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp)
    return grads[0], list(grads[1:]), None, None, None, None, None


_inner_block_triton_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------

_IMPLEMENTED = {"reference": None, "triton": None}
# backend=None on CUDA stays on the reference until the fused kernel has passed its GPU tests on
# hardware (scripts/gpu_suite.sh); until then it runs only when asked for by name.
_PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": (), "cuda": ()}


def fused_unsupported(x: torch.Tensor, C: int, hidden: int, num_heads: int) -> str | None:
    """None when the Triton fused kernel covers this problem, else why not (a sentence)."""
    if x.dtype not in _FUSED_DTYPES:
        return f"dtype {x.dtype} (the fused kernel supports float32, float16, bfloat16)"
    m = x.shape[1]
    if not 1 <= m <= MAX_FUSED_WORDS:
        return f"m = {m} words (the fused kernel supports 1 <= m <= {MAX_FUSED_WORDS})"
    if not 1 <= C <= MAX_FUSED_DIM:
        return f"C = {C} (the fused kernel supports 1 <= C <= {MAX_FUSED_DIM})"
    if hidden > 4 * _block(C):
        return f"MLP hidden width {hidden} (the fused kernel supports up to 4 · next_pow2(C) = {4 * _block(C)})"
    return None


def resolve_backend(x: torch.Tensor, C: int, hidden: int, num_heads: int, backend: str | None) -> str:
    """'triton' or 'reference' for `inner_block`; raises like `inner_block` for an explicit backend
    that cannot run."""
    name = _backend.resolve("inner_block", backend, x.device, _IMPLEMENTED, _PREFERENCE)
    if name == "triton":
        why = fused_unsupported(x, C, hidden, num_heads)
        if why is not None:
            if backend is None:
                return "reference"
            raise ValueError(f"inner_block: the 'triton' backend does not support {why}")
    return name


def fused_available(x: torch.Tensor, C: int, hidden: int, num_heads: int, backend: str | None) -> bool:
    """True when `inner_block(..., backend=backend)` would run the fused Triton kernel for x; a
    backend this op does not implement (or that cannot run here) answers False instead of raising."""
    try:
        return resolve_backend(x, C, hidden, num_heads, backend) == "triton"
    except (RuntimeError, ValueError):
        return False


def inner_block(x: torch.Tensor, params: Mapping[str, torch.Tensor | None], *, num_heads: int,
                eps: float | tuple[float, float] = 1e-5,
                drop_path_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                compute_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """TNT's inner (word-level) sub-block, LN → MHA → residual → LN → MLP(GELU) → residual, fused.

    Args:
        x: (S, m, C) word tokens of S sentences (TNT: S = batch · sentences), any strides;
            float16, bfloat16 or float32 (float64 with the reference backend).
        params: timm names relative to a TNT Block (`PARAM_NAMES`: "norm_in.weight", ...,
            "mlp_in.fc2.bias") → tensors of shapes LN (C,), qk (2C, C) / (2C,), v and proj (C, C) /
            (C,), fc1 (hidden, C) / (hidden,), fc2 (C, hidden) / (C,); the qk and v biases may be
            missing or None. Any floating dtype: they are cast to the compute dtype (differentiably).
        num_heads: H, dividing C; head_dim = C / H, attention scale head_dim ** -0.5 (timm).
        eps: LayerNorm eps, one float or (eps of norm_in, eps of norm_mlp_in).
        drop_path_scales: None, or (s_attn, s_mlp), each (S,) on x's device: per-sentence factor
            on each residual branch (DropPath's mask / keep_prob); no gradient flows to them.
        compute_dtype: dtype of the parameters and GEMM inputs (default x's dtype; float16 or
            bfloat16 with a float32 x is what autocast does: the residual stream stays float32).
        backend: None (the fused kernel where it is the default for the device, else the
            reference; TNTKERNELS_BACKEND overrides), "reference" or "triton".
    Returns:
        (S, m, C), contiguous, x's dtype. Differentiable with respect to x and every parameter.
    Raises:
        TypeError: x or a parameter is not a tensor; params not a mapping; eps, compute_dtype or
            drop_path_scales of the wrong type.
        ValueError: x not 3-D or C = 0; a parameter missing or of the wrong shape; C not divisible by
            num_heads; tensors on different devices; eps not positive; compute_dtype neither x's
            dtype nor float16/bfloat16 with a float32 x; with backend "triton": a dtype, m, C or
            hidden width outside its range (m, C <= 64, hidden <= 4·next_pow2(C)).
            Every check: docs/bad-input.md.
        RuntimeError: the backend is unknown for this op or unavailable on x's device.
    Source: Han et al. 2021 (TNT), Eq. 4-5; timm `timm.models.tnt.Block.forward` (inner half).
    """
    op = "inner_block"
    check_tensor(op, "x", x, 3, "(S, m, C)")
    S, m, C = x.shape
    if C < 1:
        raise ValueError(f"{op}: x must have width C >= 1 in (S, m, C), got shape {tuple(x.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"{op}: num_heads must be a positive int dividing C = {C}, got {num_heads!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"{op}: params must be a mapping of timm names to tensors (e.g. a dict or "
                        f"module.state_dict()), got {type(params).__name__}")
    w1 = params.get("mlp_in.fc1.weight")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise ValueError(f"{op}: params['mlp_in.fc1.weight'] must be a (hidden, C) tensor")
    hidden = w1.shape[0]
    shapes = _param_shapes(C, hidden)
    compute = compute_dtype or x.dtype
    if not isinstance(compute, torch.dtype):
        raise TypeError(f"{op}: compute_dtype must be None or a torch.dtype, got {type(compute).__name__} {compute!r}")
    if compute != x.dtype and not (x.dtype == torch.float32 and compute in (torch.float16, torch.bfloat16)):
        # as autocast: only a float32 stream may compute in float16 / bfloat16 (anything else autocast
        # ignores with a warning, running silently in x's dtype)
        raise ValueError(f"{op}: compute_dtype must be x's dtype, or float16/bfloat16 with a float32 x; "
                         f"got x {x.dtype}, compute_dtype {compute}")
    flat = []
    for name in PARAM_NAMES:
        t = params.get(name)
        if t is None and name in OPTIONAL_PARAMS:
            flat.append(None)
            continue
        if t is None:
            raise ValueError(f"{op}: params must hold {name!r} (timm TNT Block names: {PARAM_NAMES})")
        check_tensor(op, f"params[{name!r}]", t)
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{op}: params[{name!r}] must have shape {shapes[name]} for C = {C}, hidden = "
                             f"{hidden}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: params[{name!r}] is on {t.device} but x is on {x.device}")
        flat.append(t)
    if drop_path_scales is not None:
        if not hasattr(drop_path_scales, "__len__"):
            raise TypeError(f"{op}: drop_path_scales must be None or a pair (s_attn, s_mlp), got "
                            f"{type(drop_path_scales).__name__}")
        if len(drop_path_scales) != 2:
            raise ValueError(f"{op}: drop_path_scales must be None or (s_attn, s_mlp)")
        for t, what in zip(drop_path_scales, ("s_attn", "s_mlp")):
            check_tensor(op, f"drop_path_scales {what}", t, 1, f"(S,) = ({S},)")
            if t.shape[0] != S or t.device != x.device:
                raise ValueError(f"{op}: drop_path_scales {what} must be ({S},) on {x.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
    eps_in, eps_mlp = _eps_pair(eps)
    name = resolve_backend(x, C, hidden, num_heads, backend)
    if name == "reference":
        named = dict(zip(PARAM_NAMES, flat))
        if compute == x.dtype:
            named = {n: (t.to(compute) if t is not None else None) for n, t in named.items()}
            return inner_block_ref(x, named, num_heads=num_heads, eps=(eps_in, eps_mlp),
                                   drop_path_scales=drop_path_scales)
        with torch.autocast(x.device.type, dtype=compute):  # what compute_dtype stands for
            return inner_block_ref(x, named, num_heads=num_heads, eps=(eps_in, eps_mlp),
                                   drop_path_scales=drop_path_scales)
    zeros = {"attn_in.qk.bias": 2 * C, "attn_in.v.bias": C}
    # LayerNorm parameters stay float32 (LayerNorm runs in float32, as under CUDA autocast); the
    # Linear weights and biases take the compute dtype, as autocast casts them.
    tensors = [(t if t is not None else x.new_zeros(zeros[n])).to(
        torch.float32 if n in _LN_PARAMS else compute).contiguous() for n, t in zip(PARAM_NAMES, flat)]
    if drop_path_scales is None:
        s_attn = s_mlp = x.new_ones(S, dtype=torch.float32)
    else:
        s_attn, s_mlp = (t.detach().to(torch.float32).contiguous() for t in drop_path_scales)
    return _inner_block_triton_op(x, tensors, s_attn, s_mlp, num_heads, eps_in, eps_mlp)

"""Triton kernels for TNT's fused inner (word-level) sub-block, and their custom ops.

Semantics: `inner_block_ref` (LN → MHA → residual → LN → MLP(GELU) → residual over the m words of
each sentence). The forward kernel keeps a group of sentences (BLOCK_R rows = whole sentences) in
registers from the load of x to the store of y; the backward kernel recomputes that forward and
accumulates every weight gradient in registers over the groups a program visits, then writes one
fp32 partial per program, summed by `torch.sum` afterwards: no atomics, bitwise deterministic.

Heads are picked out of the (rows, C) q / k / v tiles with 0/1 selection matrices E_h (C × head_dim)
through `tl.dot`, which is exact, so the projections stay full-width GEMM tiles.

Custom ops:
    tntkernels::inner_block_triton(x, params: Tensor[14], attn_scale, mlp_scale, num_heads, eps_in,
        eps_mlp) -> y
    tntkernels::inner_block_triton_backward(grad_y, x, params, attn_scale, mlp_scale, num_heads, eps_in,
        eps_mlp) -> [dx, d<param> for each of PARAM_NAMES]
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.inner_block import PARAM_NAMES, inner_block_ref
from ._common import DTYPES, device_guard, next_pow2, shared_limit_kb

if _backend.triton_importable():
    import triton
    import triton.language as tl

    from ._common import dot_ieee, gelu, gelu_grad, layer_norm, layer_norm_bwd, load_mat, load_vec

MAX_DIM = 64  # C: a whole row of every tile sits in registers
MAX_WORDS = 64  # m
# the kernels' pointer arguments for the parameters, in PARAM_NAMES order; LayerNorm ones are float32
PARAM_POINTERS = ("LN1W", "LN1B", "QKW", "QKB", "VW", "VB", "PW", "PB", "LN2W", "LN2B", "W1", "B1", "W2", "B2")
LN_POINTERS = ("LN1W", "LN1B", "LN2W", "LN2B")


def triton_config(m: int, C: int, head_dim: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_R forward, BLOCK_R backward, BLOCK_C, BLOCK_D, BLOCK_F, num_warps) for m words, width C
    and head_dim. A group is BLOCK_R // m whole sentences; the MLP hidden width may be up to
    BLOCK_F = 4 · BLOCK_C (timm's inner MLP is 4C).

    Chosen from the compiled kernels' resource usage (no GPU timing yet): for TNT-S (m 16, C 24,
    head_dim 6) in bf16 on sm_90, 8 warps keep the forward at 64 rows free of spills, and the
    backward, which carries every weight gradient in registers, spills least at 32 rows.
    """
    bc, bd = next_pow2(C), next_pow2(head_dim)
    br_fwd = max(next_pow2(m), 64 if bc <= 32 else 32)
    br_bwd = max(next_pow2(m), 32)
    return br_fwd, br_bwd, bc, bd, 4 * bc, 8


# (x dtype, compute dtype): x / y / dx keep the residual stream's dtype; parameters and tl.dot
# inputs use the compute dtype (under autocast: float32 stream, bfloat16 or float16 compute).
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float16), (torch.float32, torch.bfloat16))


def triton_configs() -> list[tuple[int, int, int, int, int, int, torch.dtype, torch.dtype]]:
    """Every (BLOCK_R fwd, BLOCK_R bwd, BLOCK_C, BLOCK_D, BLOCK_F, num_warps, x dtype, compute dtype)
    the launchers can choose for m, C <= 64; the tests compile each for sm_80 and sm_90."""
    tiles = set()
    for m in range(1, MAX_WORDS + 1):
        for C in range(1, MAX_DIM + 1):
            for d in range(1, C + 1):
                if C % d == 0:
                    tiles.add(triton_config(m, C, d))
    return [(*t, xd, cd) for t in sorted(tiles) for xd, cd in DTYPE_PAIRS]


# Shared memory (KB) of the configurations above 96 KB (the fused backward holds every weight of the
# sub-block and its gradient): (BLOCK_C, BLOCK_R of the backward, fp32 compute?) -> KB, the most of the
# forward and backward compiled for sm_80 / sm_90 by tests/helpers/aot.py (docs/triton-resources.md)
# with triton 3.6 and 3.8, rounded up. TNT-B's inner block (C 40 -> BLOCK_C 64) fits an H100 / H200
# (227 KB) only with 16-bit compute; in float32 or on an A100 (163 KB) TNTBlock runs it unfused.
SHARED_KB = {(64, 32, True): 290, (64, 32, False): 220, (64, 64, True): 400, (64, 64, False): 300,
             (32, 64, True): 140}


def shared_kb(block_c: int, block_r_bwd: int, compute: torch.dtype) -> int:
    """Upper bound of the shared memory (KB) of one configuration's kernels (SHARED_KB, else 96)."""
    return SHARED_KB.get((block_c, block_r_bwd, compute == torch.float32), 96)


def unsupported(x: torch.Tensor, C: int, hidden: int, compute: torch.dtype | None = None) -> str | None:
    """None when the fused kernel covers x (S, m, C) with MLP width `hidden` and parameters / GEMM
    inputs in `compute` (default x's dtype) on x's device, else what it does not cover (a phrase)."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the fused kernel supports float32, float16, bfloat16)"
    m = x.shape[1]
    if not 1 <= m <= MAX_WORDS:
        return f"m = {m} words (the fused kernel supports 1 <= m <= {MAX_WORDS})"
    if not 1 <= C <= MAX_DIM:
        return f"C = {C} (the fused kernel supports 1 <= C <= {MAX_DIM})"
    if hidden > 4 * next_pow2(C):
        return f"MLP hidden width {hidden} (the fused kernel supports up to 4 · next_pow2(C) = {4 * next_pow2(C)})"
    compute = compute or x.dtype
    need, limit = shared_kb(next_pow2(C), max(next_pow2(m), 32), compute), shared_limit_kb(x.device)
    if limit is not None and need > limit:
        return (f"C = {C}, m = {m} with {compute} compute on this device: the fused kernels need {need} KB of "
                f"shared memory per block, the device allows {limit} KB")
    return None


if _backend.triton_importable():





    @triton.jit
    def _head_select(h, offs_c, offs_d, D, dt):
        """E_h (BLOCK_C, BLOCK_D): E[c, j] = 1 where c = h·D + j, j < D."""
        hit = (offs_c[:, None] == h * D + offs_d[None, :]) & (offs_d[None, :] < D)
        return tl.where(hit, 1.0, 0.0).to(dt)

    @triton.jit
    def _softmax_probs(q_h, k_h, same, row_ok, scale):
        """Normalized attention probabilities (rows, rows) fp32; 0 outside a row's own sentence and
        on padded rows."""
        logits = dot_ieee(q_h, tl.trans(k_h)) * scale
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
    def _attention(xn, wq, wk, wv, bq, bk, bv, io_mask, same, row_ok, offs_c, offs_d, D, H, scale, dt,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """The attention branch up to proj's input, every head of a group tile: q, k, v (rows, C) in dt
        (zeros for a poisoned sentence), the per-row poisoned flag, and o = concat_h softmax(q_h k_hᵀ ·
        scale) v_h in fp32 (NaN for a poisoned sentence)."""
        q = (dot_ieee(xn, tl.trans(wq)) + bq[None, :]).to(dt)
        k = (dot_ieee(xn, tl.trans(wk)) + bk[None, :]).to(dt)
        v = (dot_ieee(xn, tl.trans(wv)) + bv[None, :]).to(dt)
        poisoned = (_poisoned_sentences(q, io_mask, same) | _poisoned_sentences(k, io_mask, same)
                    | _poisoned_sentences(v, io_mask, same))
        q = tl.where(poisoned[:, None], 0.0, q).to(dt)
        k = tl.where(poisoned[:, None], 0.0, k).to(dt)
        v = tl.where(poisoned[:, None], 0.0, v).to(dt)
        o = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for h in range(H):
            e = _head_select(h, offs_c, offs_d, D, dt)
            p = _softmax_probs(dot_ieee(q, e).to(dt), dot_ieee(k, e).to(dt), same, row_ok, scale)
            o += dot_ieee(dot_ieee(p.to(dt), dot_ieee(v, e).to(dt)).to(dt), tl.trans(e))
        return q, k, v, poisoned, tl.where(poisoned[:, None], float("nan"), o)

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
        _, _, xn = layer_norm(x, load_vec(LN1W, offs_c, C), load_vec(LN1B, offs_c, C), c_ok, C, eps1)
        xn = xn.to(dt)
        wq = load_mat(QKW, offs_c, offs_c, C, C, C, dt)
        wk = load_mat(QKW + C * C, offs_c, offs_c, C, C, C, dt)
        wv = load_mat(VW, offs_c, offs_c, C, C, C, dt)
        q, k, v, poisoned, o = _attention(xn, wq, wk, wv, load_vec(QKB, offs_c, C), load_vec(QKB + C, offs_c, C),
                                          load_vec(VB, offs_c, C), io_mask, same, row_ok, offs_c, offs_d, D, H,
                                          scale, dt, BLOCK_R, BLOCK_C)
        wp = load_mat(PW, offs_c, offs_c, C, C, C, dt)
        a = dot_ieee(o.to(dt), tl.trans(wp)) + load_vec(PB, offs_c, C)[None, :]
        s_attn = tl.load(SA + sent, mask=row_ok, other=0.0)
        x = x + s_attn[:, None] * a
        # MLP branch
        _, _, xn = layer_norm(x, load_vec(LN2W, offs_c, C), load_vec(LN2B, offs_c, C), c_ok, C, eps2)
        w1 = load_mat(W1, offs_f, offs_c, HID, C, C, dt)  # (BLOCK_F, BLOCK_C)
        hid = gelu(dot_ieee(xn.to(dt), tl.trans(w1)) + load_vec(B1, offs_f, HID)[None, :])
        w2 = load_mat(W2, offs_c, offs_f, C, HID, HID, dt)  # (BLOCK_C, BLOCK_F)
        out = dot_ieee(hid.to(dt), tl.trans(w2)) + load_vec(B2, offs_c, C)[None, :]
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
        ln1w = load_vec(LN1W, offs_c, C)
        ln1b = load_vec(LN1B, offs_c, C)
        ln2w = load_vec(LN2W, offs_c, C)
        ln2b = load_vec(LN2B, offs_c, C)
        wq = load_mat(QKW, offs_c, offs_c, C, C, C, dt)
        wk = load_mat(QKW + C * C, offs_c, offs_c, C, C, C, dt)
        wv = load_mat(VW, offs_c, offs_c, C, C, C, dt)
        wp = load_mat(PW, offs_c, offs_c, C, C, C, dt)
        w1 = load_mat(W1, offs_f, offs_c, HID, C, C, dt)  # (BLOCK_F, BLOCK_C)
        w2 = load_mat(W2, offs_c, offs_f, C, HID, HID, dt)  # (BLOCK_C, BLOCK_F)
        bq = load_vec(QKB, offs_c, C)
        bk = load_vec(QKB + C, offs_c, C)
        bv = load_vec(VB, offs_c, C)
        bp = load_vec(PB, offs_c, C)
        b1 = load_vec(B1, offs_f, HID)
        b2 = load_vec(B2, offs_c, C)
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
            xhat1, rstd1, xn1 = layer_norm(x, ln1w, ln1b, c_ok, C, eps1)
            xn1 = xn1.to(dt)
            q, k, v, poisoned, o = _attention(xn1, wq, wk, wv, bq, bk, bv, io_mask, same, row_ok, offs_c, offs_d,
                                              D, H, scale, dt, BLOCK_R, BLOCK_C)
            o = o.to(dt)
            x1 = x + s_attn[:, None] * (dot_ieee(o, tl.trans(wp)) + bp[None, :])
            xhat2, rstd2, xn2 = layer_norm(x1, ln2w, ln2b, c_ok, C, eps2)
            xn2 = xn2.to(dt)
            hpre = dot_ieee(xn2, tl.trans(w1)) + b1[None, :]  # (BLOCK_R, BLOCK_F)
            # ---- MLP branch backward
            dy = tl.load(dY + sent[:, None] * sdy_s + word[:, None] * sdy_m + offs_c[None, :] * sdy_c,
                         mask=io_mask, other=0.0).to(tl.float32)
            dout = dy * s_mlp[:, None]
            db2 += tl.sum(dout, axis=0)
            dout = dout.to(dt)
            dw2 += dot_ieee(tl.trans(dout), gelu(hpre).to(dt))
            dhpre = dot_ieee(dout, w2) * gelu_grad(hpre)  # (BLOCK_R, BLOCK_F)
            db1 += tl.sum(dhpre, axis=0)
            dhpre = dhpre.to(dt)
            dw1 += dot_ieee(tl.trans(dhpre), xn2)
            dxn2 = dot_ieee(dhpre, w1)  # (BLOCK_R, BLOCK_C)
            dln2w += tl.sum(dxn2 * xhat2, axis=0)
            dln2b += tl.sum(dxn2, axis=0)
            dx1 = dy + layer_norm_bwd(dxn2, xhat2, rstd2, ln2w, c_ok, C)
            # ---- attention branch backward
            da = dx1 * s_attn[:, None]
            dbp += tl.sum(da, axis=0)
            da = da.to(dt)
            dwp += dot_ieee(tl.trans(da), o)
            do = dot_ieee(da, wp).to(dt)  # (BLOCK_R, BLOCK_C)
            poisoned = poisoned | _poisoned_sentences(do, io_mask, same)
            do = tl.where(poisoned[:, None], 0.0, do).to(dt)
            dq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            dk = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            dv = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for h in range(H):
                e = _head_select(h, offs_c, offs_d, D, dt)
                q_h = dot_ieee(q, e).to(dt)
                k_h = dot_ieee(k, e).to(dt)
                p = _softmax_probs(q_h, k_h, same, row_ok, scale)
                do_h = dot_ieee(do, e).to(dt)
                dp = dot_ieee(do_h, tl.trans(dot_ieee(v, e).to(dt)))  # dO vᵀ (BLOCK_R, BLOCK_R)
                ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale
                ds = ds.to(dt)
                dv += dot_ieee(dot_ieee(tl.trans(p.to(dt)), do_h).to(dt), tl.trans(e))
                dq += dot_ieee(dot_ieee(ds, k_h).to(dt), tl.trans(e))
                dk += dot_ieee(dot_ieee(tl.trans(ds), q_h).to(dt), tl.trans(e))
            dq = tl.where(poisoned[:, None], float("nan"), dq)
            dk = tl.where(poisoned[:, None], float("nan"), dk)
            dv = tl.where(poisoned[:, None], float("nan"), dv)
            dbq += tl.sum(dq, axis=0)
            dbk += tl.sum(dk, axis=0)
            dbv += tl.sum(dv, axis=0)
            dq = dq.to(dt)
            dk = dk.to(dt)
            dv = dv.to(dt)
            dwq += dot_ieee(tl.trans(dq), xn1)
            dwk += dot_ieee(tl.trans(dk), xn1)
            dwv += dot_ieee(tl.trans(dv), xn1)
            dxn1 = dot_ieee(dq, wq) + dot_ieee(dk, wk) + dot_ieee(dv, wv)
            dln1w += tl.sum(dxn1 * xhat1, axis=0)
            dln1b += tl.sum(dxn1, axis=0)
            dx = dx1 + layer_norm_bwd(dxn1, xhat1, rstd1, ln1w, c_ok, C)
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
    with device_guard(x):
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
    with device_guard(x):
        _inner_block_bwd_kernel[(programs,)](
            x, grad_y, dx, *params, attn_scale, mlp_scale, part,
            *x.stride(), *grad_y.stride(), *dx.stride()[:2],
            S, n_groups, spp, m, C, num_heads, d, hid, float(eps_in), float(eps_mlp), d ** -0.5, row,
            BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, BLOCK_F=bf, num_warps=warps)
    total = part.sum(dim=0)
    grads = {name: total[off:off + int(torch.Size(shape).numel())].view(shape)
             for name, off, shape in _partial_layout(C, hid)}
    return [dx] + [grads[name].to(p.dtype, copy=True) for name, p in zip(PARAM_NAMES, params)]  # no aliasing


# Custom ops (fake kernels for torch.compile, autograd) around the launchers

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


def _backward(inputs, outputs, grads, needs):
    x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp = inputs
    res = _inner_block_triton_backward_op(grads[0], x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp)
    return res[0], list(res[1:]), None, None, None, None, None


def _reference(x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp):
    return inner_block_ref(x, dict(zip(PARAM_NAMES, params)), num_heads=num_heads, eps=(eps_in, eps_mlp),
                           drop_path_scales=(attn_scale, mlp_scale))


register_kernel_autograd(_inner_block_triton_op, reference=_reference, backward=_backward)


def inner_block(x, params: list[torch.Tensor], attn_scale, mlp_scale, num_heads: int, eps_in: float,
                eps_mlp: float) -> torch.Tensor:
    """The Triton op: params the 14 tensors of PARAM_NAMES (contiguous; LayerNorm ones float32, the
    others in the compute dtype; absent biases as zeros); attn_scale, mlp_scale (S,) float32."""
    return _inner_block_triton_op(x, params, attn_scale, mlp_scale, num_heads, eps_in, eps_mlp)

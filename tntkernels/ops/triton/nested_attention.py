"""Triton kernels for nested-logit multi-head attention (CODA / RealFormer / Nested-TNT).

Semantics are those of `nested_attention_ref` (docs/tnt-family.md §3): per layer

    A = scale · q kᵀ;  S = A + prev_logits;  Z = S + MLP_heads(S) (CODA) or Z = S (RealFormer);
    Z = Z + noise;  out = softmax_keys(Z) v;  the op returns (out, Z).

with Z = A (+ noise) when prev_logits is None (the head-MLP is then ignored).

Tiling. A program owns every head of a (BLOCK_I = 16 query rows) × (BLOCK_J = 16 keys) tile of one
sequence, so the head-MLP, which mixes the heads at every (i, j), runs in registers as a chain of
three GEMMs over the head axis: (BLOCK_F, BLOCK_H) × (BLOCK_H, BLOCK_I·BLOCK_J) → … In float32 every
GEMM is IEEE fp32. In 16-bit (fp32 FMA GEMMs of this size spilled up to 13 KB per thread) the
forward chain runs in 3xTF32 on tensor cores (`dot_near_fp32`: close to fp32, so the LeakyReLU kinks
fall where the fp32 reference puts them; 16-bit inputs there flip kinks and fail the 2×-PyTorch rule
on the gradients) and the backward's gradient GEMMs take 16-bit inputs (`dot_as`, as PyTorch's
16-bit nn.Linear backward does), all with fp32 accumulation. Tiles are 3-D (BLOCK_H, rows, keys)
with heads as the batch axis of tl.dot. Heads are padded to BLOCK_H = 8 (H <= 8) or 16 (H <= 16);
BLOCK_F = next pow2 >= max(4H, 16). The two MLP GEMMs that contract over the heads pad BLOCK_H = 8
to 16 with zeros (`dot_k16`: triton 3.6's tl.dot needs K >= 16). The key loops run with one
pipeline stage (NUM_STAGES) to fit shared memory, and `unsupported` refuses a configuration over the
device's limit (SHARED_KB). The same kernels serve both levels:

- short sequences (T <= BLOCK_I, the TNT inner level, e.g. (B·196, 4, 16, 6)): one tile is the whole
  sequence, so one program computes all of it, forward and backward (dk, dv included);
- long sequences (T up to 1024; the outer level is (B, 6, 197, 64)): the forward walks the key tiles
  of its query rows with an online softmax; the backward runs a query-tile kernel (dq, dS = d prev_logits,
  head-MLP gradients) and a key-tile kernel (dk, dv) that recomputes P and reads dS back.

Work items (sequence × row tile, or sequence × key tile) are spread over at most `_MAX_PROGRAMS`
programs on grid axis 0 by a grid-stride loop (no 65,535 limit). Scores, softmax and the MLP's
activations run in fp32 (input_precision="ieee" for fp32 inputs); out and Z are written in q's
dtype, lse (B, H, T) in fp32. The backward uses delta = rowsum(grad_out ∘ out) (out is saved),
writes dq, dk, dv, d prev_logits and the six head-MLP gradients as per-program fp32 partials reduced
with torch.sum afterwards: no atomics, bitwise deterministic for a given shape.

Custom ops:
    tntkernels::nested_attention_triton(q, k, v, prev_logits?, head_mlp: Tensor[], noise?, scale)
        -> (out, Z, lse)
    tntkernels::nested_attention_triton_backward(grad_out, grad_z?, q, k, v, prev_logits?, head_mlp,
        noise?, out, lse, scale) -> (dq, dk, dv, dprev, dw1, db1, dw2, db2, dw3, db3)
(empty tensors stand for absent gradients: dprev when prev_logits is None, the MLP grads when the
MLP is not used).
"""
from __future__ import annotations

import torch

from ... import _backend
from .._autograd import register_kernel_autograd
from ..reference.nested_attention import LEAKY_SLOPE, nested_attention_op_ref
from ._common import DTYPES, check_fits, device_guard, next_pow2, shared_limit_kb

if _backend.triton_importable():
    import triton
    import triton.language as tl

    from ._common import dot_as, dot_ieee, dot_near_fp32, leaky_relu

MAX_TOKENS = 1024  # T (the outer level of TNT-S/B at 384² has 577 tokens)
MAX_HEADS = 16  # H: every head of a tile sits in one program
MAX_HEAD_DIM = 64  # d and dv
BLOCK_I = 16  # query rows per tile (tl.dot contracts over them in the backward: >= 16 in 16-bit)
BLOCK_J = 16  # keys per tile (contracted in P·v: >= 16)
_HEAD_BLOCKS = ((8, 0), (8, 16), (8, 32), (16, 0), (16, 64))  # (BLOCK_H, BLOCK_F); BLOCK_F 0 = no head-MLP
_DIM_BLOCKS = (16, 32, 64)  # BLOCK_D: tl.dot's contraction over d needs >= 16 in 16-bit
_MAX_PROGRAMS = 1024  # grid size cap (the backward keeps one fp32 partial of the MLP grads per program)


def _num_warps(block_h: int, block_d: int, block_f: int) -> int:
    return 8 if (block_h == 16 or block_f >= 32 or block_d == 64) else 4


# Software pipelining of the K / V tile loads (Triton's num_stages, default 3 on NVIDIA) multiplies the
# shared memory of these kernels (fp32 d 64: 224-354 KB, over every device's limit); one stage keeps
# the outer level within 227 KB (sm_90) and, but for fp32 with the head-MLP, 163 KB (sm_80).
NUM_STAGES = 1

# Shared memory (KB) of the configurations above 96 KB: the most of the three kernels, num_stages 1,
# compiled for sm_90 by tests/helpers/aot.py (docs/triton-resources.md) with triton 3.6 and 3.8,
# rounded up. (BLOCK_H, BLOCK_F, BLOCK_D, fp32?) -> KB. `unsupported` compares them with the device's
# opt-in limit per block (torch.cuda.get_device_properties().shared_memory_per_block_optin); the
# others need <= 96 KB, which every sm_80+ device has. tests/ops/triton/test_resources.py checks the
# entries against the compiles of the real shapes; BLOCK_H 16 at BLOCK_D 32 in fp32 and with the
# head-MLP at BLOCK_D 16 in fp32 were not all measured: their entries are set above the measured
# neighbours (a refusal routes to the reference, never a failed launch).
SHARED_KB = {
    (8, 0, 64, True): 140, (8, 32, 64, True): 212, (8, 32, 64, False): 98,
    (16, 0, 32, True): 148, (16, 0, 64, True): 276, (16, 0, 64, False): 148,
    (16, 64, 16, True): 236, (16, 64, 16, False): 216, (16, 64, 32, True): 330, (16, 64, 32, False): 244,
    (16, 64, 64, True): 430, (16, 64, 64, False): 308,
}


def shared_kb(block_h: int, block_f: int, block_d: int, dtype: torch.dtype) -> int:
    """Upper bound of the shared memory (KB) the kernels of one configuration request (SHARED_KB, else 96)."""
    return SHARED_KB.get((block_h, block_f, block_d, dtype == torch.float32), 96)


def triton_config(T: int, d: int, dv: int, H: int, has_mlp: bool) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_F, BLOCK_D, num_warps) the launchers use for H heads, head dims d / dv (one
    BLOCK_D = pow2 >= max(d, dv, 16)), with or without the head-MLP (BLOCK_F = 0). T does not enter:
    every T runs on 16 × 16 tiles."""
    bh = 8 if H <= 8 else 16
    bf = next_pow2(4 * H, 16) if has_mlp else 0
    bd = next_pow2(max(d, dv), 16)
    return bh, bf, bd, _num_warps(bh, bd, bf)


def triton_configs() -> list[tuple[int, int, int, torch.dtype, int]]:
    """Every (BLOCK_H, BLOCK_F, BLOCK_D, dtype, num_warps) the launchers can choose for H <= 16 and
    d, dv <= 64 (the three kernels share the set); the tests compile each for sm_80 / sm_90."""
    return [(bh, bf, bd, dtype, _num_warps(bh, bd, bf))
            for bh, bf in _HEAD_BLOCKS for bd in _DIM_BLOCKS for dtype in DTYPES]


def unsupported(q: torch.Tensor, v: torch.Tensor, has_mlp: bool = True) -> str | None:
    """None when the kernels cover q (B, H, T, d) and v (B, H, T, dv) on q's device (with the head-MLP
    when `has_mlp`: the larger configuration), else what they do not cover."""
    B, H, T, d = q.shape
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (supported: float32, float16 and bfloat16)"
    if not (T <= MAX_TOKENS and 1 <= H <= MAX_HEADS and 1 <= d <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM):
        return (f"T={T}, H={H}, d={d}, dv={v.shape[-1]} (supported: T <= {MAX_TOKENS}, 1 <= H <= {MAX_HEADS} and "
                f"1 <= d, dv <= {MAX_HEAD_DIM})")
    bh, bf, bd, _ = triton_config(T, d, v.shape[-1], H, has_mlp)
    limit = shared_limit_kb(q.device)
    if limit is not None and shared_kb(bh, bf, bd, q.dtype) > limit:
        return (f"H={H}, d={d}, dv={v.shape[-1]} in {q.dtype}{' with the head-MLP' if bf else ''} on this device: "
                f"the kernels need {shared_kb(bh, bf, bd, q.dtype)} KB of shared memory per block, the device "
                f"allows {limit} KB")
    return None


def _check(q: torch.Tensor, v: torch.Tensor, has_mlp: bool) -> None:
    check_fits("nested_attention", unsupported(q, v, has_mlp))


if _backend.triton_importable():
    @triton.jit
    def _load_mlp(W1, B1, W2, B2, W3, B3, H, F,
                  BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr):
        """The six head-MLP tensors (contiguous, nn.Linear layout), zero-padded, in fp32."""
        of = tl.arange(0, BLOCK_F)
        oh = tl.arange(0, BLOCK_H)
        f_ok = of < F
        h_ok = oh < H
        w1 = tl.load(W1 + of[:, None] * H + oh[None, :], mask=f_ok[:, None] & h_ok[None, :], other=0.0)
        b1 = tl.load(B1 + of, mask=f_ok, other=0.0)
        w2 = tl.load(W2 + of[:, None] * F + of[None, :], mask=f_ok[:, None] & f_ok[None, :], other=0.0)
        b2 = tl.load(B2 + of, mask=f_ok, other=0.0)
        w3 = tl.load(W3 + oh[:, None] * F + of[None, :], mask=h_ok[:, None] & f_ok[None, :], other=0.0)
        b3 = tl.load(B3 + oh, mask=h_ok, other=0.0)
        return (w1.to(tl.float32), b1.to(tl.float32), w2.to(tl.float32), b2.to(tl.float32),
                w3.to(tl.float32), b3.to(tl.float32))

    @triton.jit
    def _tile(base, s_b, s_h, s_r, s_c, b64, oh, rows, cols, mask, on):
        """Masked load of base[b, heads, rows, cols] (0 where masked or when `on` is 0), in fp32."""
        x = tl.load(base + b64 * s_b + oh * s_h + rows * s_r + cols * s_c, mask=mask & ((oh * 0 + on) != 0),
                    other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _scores(q, kt, b64, rows, oh, oj, valid, Prev, Noise, w1, b1, w2, b2, w3, b3,
                sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j, scale, has_prev, has_noise,
                BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
                SLOPE: tl.constexpr):
        """S = scale q kᵀ + prev and Z = S + MLP_heads(S) + noise on one (BLOCK_H, BLOCK_I, BLOCK_J) tile.
        Returns (s, x = MLP input, h1, h2, z); the MLP terms are dummies when BLOCK_F = 0. The backward
        takes LeakyReLU's derivative from the sign of h (= the sign of its input: the slope is > 0)."""
        s = dot_ieee(q, kt) * scale
        s = s + _tile(Prev, sp_b, sp_h, sp_i, sp_j, b64, oh, rows, oj, valid, has_prev)
        z = s
        x = s
        h1 = s
        h2 = s
        if BLOCK_F > 0:
            u = tl.where(valid & (s != float("-inf")), s, 0.0)
            x = tl.reshape(u, (BLOCK_H, BLOCK_I * BLOCK_J))
            h1 = leaky_relu(dot_near_fp32(w1, x, q) + b1[:, None], SLOPE)  # K = BLOCK_H
            h2 = leaky_relu(dot_near_fp32(w2, h1, q) + b2[:, None], SLOPE)
            m = dot_near_fp32(w3, h2, q) + b3[:, None]  # (BLOCK_H, BLOCK_I·BLOCK_J)
            z = s + tl.reshape(m, (BLOCK_H, BLOCK_I, BLOCK_J))
        z = z + _tile(Noise, sn_b, sn_h, sn_i, sn_j, b64, oh, rows, oj, valid, has_noise)
        return s, x, h1, h2, z

    @triton.jit
    def _axes(BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        """Index vectors of the 3-D tiles: heads (H, 1, 1), query rows (1, I, 1), keys as rows (1, J, 1)
        (k, v tiles), keys as columns (1, 1, J) (score tiles), head_dim (1, 1, D)."""
        return (tl.arange(0, BLOCK_H)[:, None, None], tl.arange(0, BLOCK_I)[None, :, None],
                tl.arange(0, BLOCK_J)[None, :, None], tl.arange(0, BLOCK_J)[None, None, :],
                tl.arange(0, BLOCK_D)[None, None, :])

    @triton.jit
    def _head_mlp_weights(W1, B1, W2, B2, W3, B3, H, F, dummy, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr):
        """The head-MLP tensors (`_load_mlp`), or six unused dummies without the MLP (BLOCK_F = 0)."""
        w1, b1, w2, b2, w3, b3 = dummy, dummy, dummy, dummy, dummy, dummy
        if BLOCK_F > 0:
            w1, b1, w2, b2, w3, b3 = _load_mlp(W1, B1, W2, B2, W3, B3, H, F, BLOCK_H, BLOCK_F)
        return w1, b1, w2, b2, w3, b3

    @triton.jit
    def _nested_attention_fwd_kernel(
        Q, K, V, Prev, Noise, W1, B1, W2, B2, W3, B3, Out, Z, Lse,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j,
        so_b, so_h, so_t, so_d, sz_b, sz_h, sz_i, sz_j, sl_b, sl_h, sl_t,
        B, H, T, D, DV, F, scale, has_prev, has_noise, n_prog,
        BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_F: tl.constexpr, SLOPE: tl.constexpr,
    ):
        oh, oi, ot, oj, od = _axes(BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_D)
        h_ok = oh < H
        w1, b1, w2, b2, w3, b3 = _head_mlp_weights(W1, B1, W2, B2, W3, B3, H, F, scale, BLOCK_H, BLOCK_F)
        n_i = tl.cdiv(T, BLOCK_I)
        zero64 = tl.program_id(0).to(tl.int64) * 0
        for w in range(tl.program_id(0), B * n_i, n_prog):
            b64 = w // n_i + zero64  # int64 offsets (w is a Python int under the interpreter)
            rows = (w % n_i) * BLOCK_I + oi
            r_ok = h_ok & (rows < T)
            q = tl.load(Q + b64 * sq_b + oh * sq_h + rows * sq_t + od * sq_d, mask=r_ok & (od < D), other=0.0)
            m_i = tl.full((BLOCK_H, BLOCK_I), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_H, BLOCK_I), tl.float32)
            acc = tl.zeros((BLOCK_H, BLOCK_I, BLOCK_D), tl.float32)
            for j0 in range(0, T, BLOCK_J):
                kr = j0 + ot
                k = tl.load(K + b64 * sk_b + oh * sk_h + kr * sk_t + od * sk_d, mask=h_ok & (kr < T) & (od < D),
                            other=0.0)
                v = tl.load(V + b64 * sv_b + oh * sv_h + kr * sv_t + od * sv_d, mask=h_ok & (kr < T) & (od < DV),
                            other=0.0)
                cols = j0 + oj
                valid = r_ok & (cols < T)  # (BLOCK_H, BLOCK_I, BLOCK_J)
                _, _, _, _, z = _scores(q, tl.trans(k, 0, 2, 1), b64, rows, oh, cols, valid, Prev, Noise,
                                              w1, b1, w2, b2, w3, b3, sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j,
                                              scale, has_prev, has_noise, BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_F, SLOPE)
                tl.store(Z + b64 * sz_b + oh * sz_h + rows * sz_i + cols * sz_j, z.to(Z.dtype.element_ty),
                         mask=valid)
                zm = tl.where(cols < T, z, float("-inf"))  # padded key columns
                m_new = tl.maximum(m_i, tl.max(zm, axis=2))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far: no inf - inf
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(zm - m_safe[:, :, None])
                l_i = l_i * alpha + tl.sum(p, axis=2)
                acc = acc * alpha[:, :, None] + dot_ieee(p.to(v.dtype), v)
                m_i = m_new
            out = acc / l_i[:, :, None]
            tl.store(Out + b64 * so_b + oh * so_h + rows * so_t + od * so_d, out.to(Out.dtype.element_ty),
                     mask=r_ok & (od < DV))
            lrows = (w % n_i) * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
            lh = tl.arange(0, BLOCK_H)[:, None]
            tl.store(Lse + b64 * sl_b + lh * sl_h + lrows * sl_t, m_i + tl.log(l_i), mask=(lh < H) & (lrows < T))

    @triton.jit
    def _nested_attention_bwd_q_kernel(
        GO, GZ, Q, K, V, Prev, Noise, W1, B1, W2, B2, W3, B3, Lse, Delta,
        dQ, dK, dV, dPrev, dW1, dB1, dW2, dB2, dW3, dB3,
        sgo_b, sgo_h, sgo_t, sgo_d, sgz_b, sgz_h, sgz_i, sgz_j,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j, sl_b, sl_h, sl_t,
        sdq_b, sdq_h, sdq_t, sdq_d, sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
        sdp_b, sdp_h, sdp_i, sdp_j,
        B, H, T, D, DV, F, scale, has_prev, has_noise, has_gz, n_prog,
        BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_F: tl.constexpr, SLOPE: tl.constexpr,
    ):
        """Per (sequence, query tile): dq, dS (stored as d prev_logits), the head-MLP gradient partials;
        when one tile holds the whole sequence (T <= BLOCK_I <= BLOCK_J) also dk and dv."""
        pid = tl.program_id(0)
        oh, oi, ot, oj, od = _axes(BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_D)
        h_ok = oh < H
        w1, b1, w2, b2, w3, b3 = _head_mlp_weights(W1, B1, W2, B2, W3, B3, H, F, scale, BLOCK_H, BLOCK_F)
        if BLOCK_F > 0:
            gw1 = tl.zeros((BLOCK_F, BLOCK_H), dtype=tl.float32)
            gb1 = tl.zeros((BLOCK_F,), dtype=tl.float32)
            gw2 = tl.zeros((BLOCK_F, BLOCK_F), dtype=tl.float32)
            gb2 = tl.zeros((BLOCK_F,), dtype=tl.float32)
            gw3 = tl.zeros((BLOCK_H, BLOCK_F), dtype=tl.float32)
            gb3 = tl.zeros((BLOCK_H,), dtype=tl.float32)
        n_i = tl.cdiv(T, BLOCK_I)
        zero64 = pid.to(tl.int64) * 0
        for w in range(pid, B * n_i, n_prog):
            b64 = w // n_i + zero64
            rows = (w % n_i) * BLOCK_I + oi
            r_ok = h_ok & (rows < T)
            q = tl.load(Q + b64 * sq_b + oh * sq_h + rows * sq_t + od * sq_d, mask=r_ok & (od < D), other=0.0)
            go = tl.load(GO + b64 * sgo_b + oh * sgo_h + rows * sgo_t + od * sgo_d, mask=r_ok & (od < DV), other=0.0)
            lse = tl.load(Lse + b64 * sl_b + oh * sl_h + rows * sl_t, mask=r_ok, other=0.0)  # (BH, BI, 1)
            delta = tl.load(Delta + b64 * sl_b + oh * sl_h + rows * sl_t, mask=r_ok, other=0.0)
            dq = tl.zeros((BLOCK_H, BLOCK_I, BLOCK_D), tl.float32)
            for j0 in range(0, T, BLOCK_J):
                kr = j0 + ot
                k = tl.load(K + b64 * sk_b + oh * sk_h + kr * sk_t + od * sk_d, mask=h_ok & (kr < T) & (od < D),
                            other=0.0)
                v = tl.load(V + b64 * sv_b + oh * sv_h + kr * sv_t + od * sv_d, mask=h_ok & (kr < T) & (od < DV),
                            other=0.0)
                cols = j0 + oj
                valid = r_ok & (cols < T)
                s, x, h1, h2, z = _scores(
                    q, tl.trans(k, 0, 2, 1), b64, rows, oh, cols, valid, Prev, Noise, w1, b1, w2, b2, w3, b3,
                    sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j, scale, has_prev, has_noise,
                    BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_F, SLOPE)
                p = tl.where(valid, tl.exp(z - lse), 0.0)
                dp = dot_ieee(go, tl.trans(v, 0, 2, 1))  # g_out vᵀ
                dz = p * (dp - delta) + _tile(GZ, sgz_b, sgz_h, sgz_i, sgz_j, b64, oh, rows, cols, valid, has_gz)
                dz = tl.where(valid, dz, 0.0)
                ds = dz
                if BLOCK_F > 0:
                    dm = tl.reshape(dz, (BLOCK_H, BLOCK_I * BLOCK_J))
                    gw3 += dot_as(dm, tl.trans(h2), q)
                    gb3 += tl.sum(dm, axis=1)
                    dh2 = dot_as(tl.trans(w3), dm, q)  # K = BLOCK_H
                    dh2 = tl.where(h2 > 0, dh2, dh2 * SLOPE)
                    gw2 += dot_as(dh2, tl.trans(h1), q)
                    gb2 += tl.sum(dh2, axis=1)
                    dh1 = dot_as(tl.trans(w2), dh2, q)
                    dh1 = tl.where(h1 > 0, dh1, dh1 * SLOPE)
                    gw1 += dot_as(dh1, tl.trans(x), q)
                    gb1 += tl.sum(dh1, axis=1)
                    du = tl.reshape(dot_as(tl.trans(w1), dh1, q), (BLOCK_H, BLOCK_I, BLOCK_J))
                    ds = dz + tl.where(valid & (s != float("-inf")), du, 0.0)
                tl.store(dPrev + b64 * sdp_b + oh * sdp_h + rows * sdp_i + cols * sdp_j,
                         ds.to(dPrev.dtype.element_ty), mask=valid & ((oh * 0 + has_prev) != 0))
                da = ds * scale
                dq += dot_ieee(da.to(k.dtype), k)
                if T <= BLOCK_I:  # the whole sequence is this tile: dk, dv here (no key-tile kernel)
                    dk = dot_ieee(tl.trans(da, 0, 2, 1).to(q.dtype), q)
                    dv = dot_ieee(tl.trans(p, 0, 2, 1).to(go.dtype), go)
                    tl.store(dK + b64 * sdk_b + oh * sdk_h + kr * sdk_t + od * sdk_d, dk.to(dK.dtype.element_ty),
                             mask=h_ok & (kr < T) & (od < D))
                    tl.store(dV + b64 * sdv_b + oh * sdv_h + kr * sdv_t + od * sdv_d, dv.to(dV.dtype.element_ty),
                             mask=h_ok & (kr < T) & (od < DV))
            tl.store(dQ + b64 * sdq_b + oh * sdq_h + rows * sdq_t + od * sdq_d, dq.to(dQ.dtype.element_ty),
                     mask=r_ok & (od < D))
        if BLOCK_F > 0:
            of = tl.arange(0, BLOCK_F)
            oh2 = tl.arange(0, BLOCK_H)
            f_ok = of < F
            hh_ok = oh2 < H
            tl.store(dW1 + pid * F * H + of[:, None] * H + oh2[None, :], gw1, mask=f_ok[:, None] & hh_ok[None, :])
            tl.store(dB1 + pid * F + of, gb1, mask=f_ok)
            tl.store(dW2 + pid * F * F + of[:, None] * F + of[None, :], gw2, mask=f_ok[:, None] & f_ok[None, :])
            tl.store(dB2 + pid * F + of, gb2, mask=f_ok)
            tl.store(dW3 + pid * H * F + oh2[:, None] * F + of[None, :], gw3, mask=hh_ok[:, None] & f_ok[None, :])
            tl.store(dB3 + pid * H + oh2, gb3, mask=hh_ok)

    @triton.jit
    def _nested_attention_bwd_kv_kernel(
        GO, GZ, Q, K, V, Prev, Noise, W1, B1, W2, B2, W3, B3, Lse, Delta, dPrev, dK, dV,
        sgo_b, sgo_h, sgo_t, sgo_d, sgz_b, sgz_h, sgz_i, sgz_j,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j, sl_b, sl_h, sl_t,
        sdp_b, sdp_h, sdp_i, sdp_j, sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
        B, H, T, D, DV, F, scale, has_prev, has_noise, has_gz, n_prog,
        BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_F: tl.constexpr, SLOPE: tl.constexpr,
    ):
        """Per (sequence, key tile), T > BLOCK_J: dk = Σ_i dSᵀ q · scale and dv = Σ_i Pᵀ g_out. P is
        recomputed (scores, head-MLP, lse); dS is read back from d prev_logits when prev_logits is
        given (the query-tile kernel wrote it), else recomputed (no head-MLP then)."""
        oh, oi, ot, oj, od = _axes(BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_D)
        h_ok = oh < H
        w1, b1, w2, b2, w3, b3 = _head_mlp_weights(W1, B1, W2, B2, W3, B3, H, F, scale, BLOCK_H, BLOCK_F)
        n_j = tl.cdiv(T, BLOCK_J)
        zero64 = tl.program_id(0).to(tl.int64) * 0
        for w in range(tl.program_id(0), B * n_j, n_prog):
            b64 = w // n_j + zero64
            kr = (w % n_j) * BLOCK_J + ot
            k_ok = h_ok & (kr < T)
            k = tl.load(K + b64 * sk_b + oh * sk_h + kr * sk_t + od * sk_d, mask=k_ok & (od < D), other=0.0)
            v = tl.load(V + b64 * sv_b + oh * sv_h + kr * sv_t + od * sv_d, mask=k_ok & (od < DV), other=0.0)
            kt = tl.trans(k, 0, 2, 1)
            vt = tl.trans(v, 0, 2, 1)
            cols = (w % n_j) * BLOCK_J + oj
            dk = tl.zeros((BLOCK_H, BLOCK_J, BLOCK_D), tl.float32)
            dv = tl.zeros((BLOCK_H, BLOCK_J, BLOCK_D), tl.float32)
            for i0 in range(0, T, BLOCK_I):
                rows = i0 + oi
                r_ok = h_ok & (rows < T)
                valid = r_ok & (cols < T)
                q = tl.load(Q + b64 * sq_b + oh * sq_h + rows * sq_t + od * sq_d, mask=r_ok & (od < D), other=0.0)
                go = tl.load(GO + b64 * sgo_b + oh * sgo_h + rows * sgo_t + od * sgo_d, mask=r_ok & (od < DV),
                             other=0.0)
                lse = tl.load(Lse + b64 * sl_b + oh * sl_h + rows * sl_t, mask=r_ok, other=0.0)
                _, _, _, _, z = _scores(q, kt, b64, rows, oh, cols, valid, Prev, Noise,
                                              w1, b1, w2, b2, w3, b3, sp_b, sp_h, sp_i, sp_j, sn_b, sn_h, sn_i, sn_j,
                                              scale, has_prev, has_noise, BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_F, SLOPE)
                p = tl.where(valid, tl.exp(z - lse), 0.0)
                if has_prev != 0:
                    ds = _tile(dPrev, sdp_b, sdp_h, sdp_i, sdp_j, b64, oh, rows, cols, valid, has_prev)
                else:
                    delta = tl.load(Delta + b64 * sl_b + oh * sl_h + rows * sl_t, mask=r_ok, other=0.0)
                    dp = dot_ieee(go, vt)
                    ds = p * (dp - delta) + _tile(GZ, sgz_b, sgz_h, sgz_i, sgz_j, b64, oh, rows, cols, valid, has_gz)
                    ds = tl.where(valid, ds, 0.0)
                da = ds * scale
                dk += dot_ieee(tl.trans(da, 0, 2, 1).to(q.dtype), q)
                dv += dot_ieee(tl.trans(p, 0, 2, 1).to(go.dtype), go)
            tl.store(dK + b64 * sdk_b + oh * sdk_h + kr * sdk_t + od * sdk_d, dk.to(dK.dtype.element_ty),
                     mask=k_ok & (od < D))
            tl.store(dV + b64 * sdv_b + oh * sdv_h + kr * sdv_t + od * sdv_d, dv.to(dV.dtype.element_ty),
                     mask=k_ok & (od < DV))


def _mlp_args(q: torch.Tensor, head_mlp, use_mlp: bool) -> list[torch.Tensor]:
    if use_mlp:
        return [t.contiguous() for t in head_mlp]
    return [q] * 6  # never read (BLOCK_F = 0)


def _strides4(t: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _n_prog(items: int) -> int:
    return max(1, min(items, _MAX_PROGRAMS))


def nested_attention_forward(q, k, v, prev_logits, head_mlp, noise, scale):
    """Triton forward. q, k (B, H, T, d); v (B, H, T, dv); prev_logits / noise None or (B, H, T, T);
    head_mlp a list of the 6 MLP tensors or empty; any strides. Returns out (B, H, T, dv) and Z
    (B, H, T, T) contiguous in q's dtype, lse (B, H, T) float32."""
    _check(q, v, prev_logits is not None and len(head_mlp) > 0)
    B, H, T, d = q.shape
    dv = v.shape[-1]
    out = q.new_empty((B, H, T, dv))
    z = q.new_empty((B, H, T, T))
    lse = q.new_empty((B, H, T), dtype=torch.float32)
    if B == 0 or T == 0:
        return out, z, lse
    use_mlp = prev_logits is not None and len(head_mlp) > 0
    bh, bf, bd, warps = triton_config(T, d, dv, H, use_mlp)
    bi = BLOCK_I
    n_prog = _n_prog(B * -(-T // bi))
    prev = prev_logits if prev_logits is not None else z
    nz = noise if noise is not None else z
    with device_guard(q):
        _nested_attention_fwd_kernel[(n_prog,)](
            q, k, v, prev, nz, *_mlp_args(q, head_mlp, use_mlp), out, z, lse,
            *q.stride(), *k.stride(), *v.stride(), *prev.stride(), *nz.stride(),
            *out.stride(), *z.stride(), *lse.stride(),
            B, H, T, d, dv, 4 * H, float(scale), int(prev_logits is not None), int(noise is not None), n_prog,
            BLOCK_H=bh, BLOCK_I=bi, BLOCK_J=BLOCK_J, BLOCK_D=bd, BLOCK_F=bf, SLOPE=LEAKY_SLOPE, num_warps=warps,
            num_stages=NUM_STAGES)
    return out, z, lse


def nested_attention_backward(grad_out, grad_z, q, k, v, prev_logits, head_mlp, noise, out, lse, scale):
    """Triton backward, deterministic (no atomics). Returns (dq, dk, dv, dprev, [dw1, db1, dw2, db2, dw3,
    db3]) in q's dtype; dprev is None when prev_logits is None, the list empty without the MLP."""
    _check(q, v, prev_logits is not None and len(head_mlp) > 0)
    B, H, T, d = q.shape
    dvd = v.shape[-1]
    F = 4 * H
    dq = q.new_empty((B, H, T, d))
    dk = q.new_empty((B, H, T, d))
    dv = q.new_empty((B, H, T, dvd))
    dprev = q.new_empty((B, H, T, T)) if prev_logits is not None else None
    use_mlp = prev_logits is not None and len(head_mlp) > 0
    bh, bf, bd, warps = triton_config(T, d, dvd, H, use_mlp)
    bi = BLOCK_I
    n_prog = _n_prog(B * -(-T // bi))
    shapes = ((F, H), (F,), (F, F), (F,), (H, F), (H,))
    partials = [q.new_zeros((n_prog, *s), dtype=torch.float32) for s in shapes] if use_mlp else [q] * 6
    if B > 0 and T > 0:
        grad_out = grad_out.to(q.dtype)
        lse = lse.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(g_out ∘ out) = Σ_j P dP
        gz = grad_z.to(q.dtype) if grad_z is not None else q
        prev = prev_logits if prev_logits is not None else q
        nz = noise if noise is not None else q
        dp = dprev if dprev is not None else q
        common = (*grad_out.stride(), *_strides4(grad_z), *q.stride(), *k.stride(), *v.stride(),
                  *_strides4(prev_logits), *_strides4(noise), *lse.stride())
        flags = (B, H, T, d, dvd, F, float(scale), int(prev_logits is not None), int(noise is not None),
                 int(grad_z is not None))
        meta = dict(BLOCK_H=bh, BLOCK_I=bi, BLOCK_J=BLOCK_J, BLOCK_D=bd, BLOCK_F=bf, SLOPE=LEAKY_SLOPE,
                    num_warps=warps, num_stages=NUM_STAGES)
        inputs = (grad_out, gz, q, k, v, prev, nz, *_mlp_args(q, head_mlp, use_mlp), lse, delta)
        with device_guard(q):
            _nested_attention_bwd_q_kernel[(n_prog,)](
                *inputs, dq, dk, dv, dp, *partials, *common,
                *dq.stride(), *dk.stride(), *dv.stride(), *_strides4(dprev), *flags, n_prog, **meta)
            if T > bi:  # several tiles: dk, dv by key tile (reads dS back from dprev)
                n_kv = _n_prog(B * -(-T // BLOCK_J))
                _nested_attention_bwd_kv_kernel[(n_kv,)](
                    *inputs, dp, dk, dv, *common, *_strides4(dprev), *dk.stride(), *dv.stride(), *flags, n_kv, **meta)
    grads = []
    if use_mlp:
        grads = [p.sum(dim=0).to(w.dtype) for p, w in zip(partials, head_mlp)]
    return dq, dk, dv, dprev, grads


# ---------------------------------------------------------------------------------------------
# Custom ops (+ fake kernels, autograd)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tntkernels::nested_attention_triton", mutates_args=())
def _nested_attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prev_logits: torch.Tensor | None,
                                head_mlp: list[torch.Tensor], noise: torch.Tensor | None,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return nested_attention_forward(q, k, v, prev_logits, head_mlp, noise, scale)


@_nested_attention_triton_op.register_fake
def _nested_attention_triton_fake(q, k, v, prev_logits, head_mlp, noise, scale):
    B, H, T, _ = q.shape
    return (q.new_empty((B, H, T, v.shape[-1])), q.new_empty((B, H, T, T)),
            q.new_empty((B, H, T), dtype=torch.float32))


@torch.library.custom_op("tntkernels::nested_attention_triton_backward", mutates_args=())
def _nested_attention_triton_backward_op(
        grad_out: torch.Tensor, grad_z: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        prev_logits: torch.Tensor | None, head_mlp: list[torch.Tensor], noise: torch.Tensor | None,
        out: torch.Tensor, lse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dprev, grads = nested_attention_backward(grad_out, grad_z, q, k, v, prev_logits, head_mlp, noise,
                                                         out, lse, scale)
    return _pack_backward(q, dq, dk, dv, dprev, grads)


def _pack_backward(q, dq, dk, dv, dprev, grads):
    if not grads:
        grads = [q.new_empty((0,)) for _ in range(6)]  # distinct tensors: returns may not alias
    return dq, dk, dv, (dprev if dprev is not None else q.new_empty((0,))), *grads


@_nested_attention_triton_backward_op.register_fake
def _nested_attention_triton_backward_fake(grad_out, grad_z, q, k, v, prev_logits, head_mlp, noise, out, lse,
                                           scale):
    B, H, T, d = q.shape
    use_mlp = prev_logits is not None and len(head_mlp) > 0
    dprev = q.new_empty((B, H, T, T)) if prev_logits is not None else None
    grads = [t.new_empty(t.shape) for t in head_mlp] if use_mlp else []
    return _pack_backward(q, q.new_empty((B, H, T, d)), q.new_empty((B, H, T, d)),
                          q.new_empty((B, H, T, v.shape[-1])), dprev, grads)


def _backward(inputs, outputs, grads, needs):
    q, k, v, prev_logits, head_mlp, noise, scale = inputs
    out, lse = outputs
    grad_out, grad_z = grads
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    res = _nested_attention_triton_backward_op(grad_out.contiguous(), grad_z, q, k, v, prev_logits, list(head_mlp),
                                               noise, out, lse, scale)
    use_mlp = prev_logits is not None and len(head_mlp) > 0
    gm = list(res[4:]) if use_mlp else [None] * len(head_mlp)
    return res[0], res[1], res[2], (res[3] if prev_logits is not None else None), gm, None, None


register_kernel_autograd(_nested_attention_triton_op, reference=nested_attention_op_ref, backward=_backward,
                         saved_outputs=(0, 2), non_differentiable=(2,))


def nested_attention(q, k, v, prev_logits, head_mlp, noise, scale: float):
    """The Triton op (inputs checked by `tntkernels.nested_attention`); head_mlp six tensors or None.
    Returns (out, logits)."""
    out, z, _ = _nested_attention_triton_op(q, k, v, prev_logits, list(head_mlp or ()), noise, scale)
    return out, z

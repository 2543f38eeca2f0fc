"""Inner attention and the TNT inner sub-block: ours against what PyTorch users run today.

Shapes (docs/baselines.md §2): TNT-S (S = B·196 sentences, 4 heads, 16 words, head_dim 6) and TNT-B
(head_dim 10) at B = 64 and 256; fp32 and bf16; forward, backward and forward+backward; median time
(p20, p80) and peak memory; each of ours also as % of the memory roofline (bytes that must move,
divided by the measured device-to-device copy bandwidth).

Attention candidates: timm eager (materialized logits), F.scaled_dot_product_attention,
torch.compile of timm eager (default, max-autotune-no-cudagraphs), FlexAttention (compiled, where it
compiles), ours (every backend available: cuda, triton; cpu on CPU).
Inner sub-block (LN → attn → residual → LN → MLP → residual): timm eager, torch.compile(timm), ours
(our attention inside the modules, and the whole sub-block as one fused Triton kernel).

    python benchmarks/bench_inner_attention.py                        # GPU: the full sweep
    python benchmarks/bench_inner_attention.py --device cpu --quick   # smoke run on CPU
Writes JSON (--out, or --out-dir; rewritten after every row), prints a table, and plots a PNG next to
the JSON (matplotlib, if installed). Timing, rows, JSON, table and plot: benchmarks/harness.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import harness  # benchmarks/harness.py; first: it puts the repository root on sys.path
import tntkernels
from tntkernels import _backend
from tntkernels.nn import Attention, Mlp, fused_inner_sublayer

SHAPES = {"tnt_s": dict(dim=24, heads=4, words=16), "tnt_b": dict(dim=40, heads=4, words=16)}
COLUMNS = [harness.column("what", "what", width=11, left=True), harness.column("shape", "shape", width=6, left=True),
           harness.column("B", "batch", width=4), harness.column("dtype", "dtype", width=8, left=True),
           harness.column("pass", "pass_", width=8, left=True), harness.column("impl", "impl", width=34, left=True),
           harness.column("median ms", "median_ms", "{:.3f}", width=10, missing="n/a"),
           harness.column("peak MiB", "peak_mib", "{:.1f}", width=9),
           harness.column("roofline", "roofline_pct", "{:.0f}%", width=8), harness.NOTE]


def implemented() -> list[str]:
    """inner_attention's backends (asked of the op on meta tensors)."""
    t = torch.empty(1, 1, 2, 2, device="meta")
    return harness.implemented_backends(lambda b: tntkernels.inner_attention(t, t, t, backend=b))


# ------------------------------------------------------------------ attention candidates

def timm_eager(q, k, v):
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (S, H, m, m)
    return attn.softmax(dim=-1) @ v


def flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v)


def attention_candidates(device: torch.device, quick: bool, backends):
    # ours first: a run cut short by its time limit still has them (the JSON is rewritten after every row)
    for name in ("cuda", "triton", "cpu"):
        if harness.runnable(name, backends, device):
            yield f"ours_{name}", (lambda q, k, v, name=name: tntkernels.inner_attention(q, k, v, backend=name))
    yield "timm_eager", timm_eager
    yield "sdpa", F.scaled_dot_product_attention
    if device.type == "cuda" or not quick:
        yield "compile(timm_eager)", torch.compile(timm_eager)
        if device.type == "cuda":
            yield "compile-max-autotune(timm_eager)", torch.compile(timm_eager, mode="max-autotune-no-cudagraphs")
            yield "flex_attention(compiled)", torch.compile(flex)


def attention_bytes(S, H, m, d, elem, pas):
    """Bytes each pass must move at least: q, k, v read and out written (fwd); plus lse; backward
    reads q, k, v, out, dout, lse and writes dq, dk, dv."""
    t, lse = S * H * m * d * elem, S * H * m * 4
    fwd, bwd = 4 * t + lse, 8 * t + lse
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pas]


# ------------------------------------------------------------------ inner sub-block candidates

class InnerBlock(nn.Module):
    """TNT's word-level sub-block: x + attn(LN(x)), then + MLP(LN(x)) (timm names). fused=True runs
    it as tntkernels' one fused Triton kernel (`fused_inner_sublayer`) and fails if that cannot run."""

    def __init__(self, dim, heads, attn: nn.Module, fused: bool = False):
        super().__init__()
        self.norm_in, self.attn_in = nn.LayerNorm(dim), attn
        self.norm_mlp_in, self.mlp_in = nn.LayerNorm(dim), Mlp(dim, 4 * dim, dim)
        self.fused = fused

    def forward(self, x):
        if self.fused:
            y = fused_inner_sublayer(x, self.norm_in, self.attn_in, self.norm_mlp_in, self.mlp_in, nn.Identity())
            if y is None:
                raise RuntimeError("the fused inner block does not apply here")
            return y
        x = x + self.attn_in(self.norm_in(x))
        return x + self.mlp_in(self.norm_mlp_in(x))


def block_candidates(dim, heads, device, dtype, quick, backends):
    try:
        from timm.models.tnt import Attention as TimmAttention
    except ImportError:
        TimmAttention = None
    # ours first (see attention_candidates)
    if _backend.why_unavailable("triton", device) is None:
        yield "ours_fused_triton", InnerBlock(dim, heads, Attention(dim, dim, num_heads=heads, backend="triton"),
                                              fused=True).to(device, dtype)
    for name in ("cuda", "triton", "cpu"):
        if harness.runnable(name, backends, device):
            yield f"ours_{name}", InnerBlock(dim, heads, Attention(dim, dim, num_heads=heads, backend=name)).to(device, dtype)
    if TimmAttention is not None:
        timm_block = InnerBlock(dim, heads, TimmAttention(dim, dim, num_heads=heads)).to(device, dtype)
        yield "timm_eager", timm_block
        if device.type == "cuda" or not quick:
            yield "compile(timm)", torch.compile(timm_block)


# ------------------------------------------------------------------ driver

def block_bytes(S, m, dim, elem, pas):
    """Bytes each pass must move at least: the tokens read once and written once per pass."""
    return 2 * S * m * dim * elem * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pas]


def parse_args(argv=None):
    """The command line: harness.parser()'s common arguments and this benchmark's own."""
    ap = harness.parser(__doc__, shapes=SHAPES)
    ap.add_argument("--batch", type=int, nargs="+", help="images per batch (default 64 256 on GPU, 2 on CPU)")
    ap.add_argument("--what", nargs="+", choices=("attention", "block"), default=["attention", "block"])
    return harness.parse(ap, argv, __file__)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    batches = args.batch or ([64, 256] if args.gpu else [2])
    backends = implemented()
    bandwidth = harness.copy_bandwidth(device)
    meta = harness.environment(device, benchmark="inner_attention", backends_implemented=backends,
                               copy_bandwidth_GBps=bandwidth / 1e9 if bandwidth else None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    results = harness.Results(args.out, meta, COLUMNS, plot_spec={}, budget=args.budget)

    def roofline(nbytes):  # % of the memory roofline, for ours only
        return lambda impl, pas, m, out: dict(
            roofline_pct=harness.floor_pct(m["median_ms"], nbytes(pas), bandwidth) if impl.startswith("ours") else None)

    with results:
        for shape_name in args.shapes:
            dim, H, m = SHAPES[shape_name]["dim"], SHAPES[shape_name]["heads"], SHAPES[shape_name]["words"]
            d = dim // H
            for B in batches:
                S = B * 196
                for dtype_name in args.dtypes:
                    dtype = getattr(torch, dtype_name)
                    elem = torch.finfo(dtype).bits // 8
                    case = dict(shape=shape_name, batch=B, S=S, H=H, m=m, d=d, dtype=dtype_name)
                    if "attention" in args.what:
                        q, k, v = (torch.randn(S, H, m, d, generator=gen).to(device, dtype).requires_grad_()
                                   for _ in range(3))
                        grad = torch.randn(S, H, m, d, generator=gen).to(device, dtype)
                        harness.measure_candidates(
                            results, dict(what="attention", **case), attention_candidates(device, args.quick, backends),
                            (q, k, v), grad, args, extra=roofline(lambda pas: attention_bytes(S, H, m, d, elem, pas)))
                        del q, k, v, grad
                    if "block" in args.what:
                        x = torch.randn(S, m, dim, generator=gen).to(device, dtype).requires_grad_()
                        grad = torch.randn(S, m, dim, generator=gen).to(device, dtype)
                        torch.manual_seed(0)
                        harness.measure_candidates(
                            results, dict(what="inner_block", **case),
                            block_candidates(dim, H, device, dtype, args.quick, backends), (x,), grad, args,
                            extra=roofline(lambda pas: block_bytes(S, m, dim, elem, pas)))
                        del x, grad
    return results.rows


if __name__ == "__main__":
    main()

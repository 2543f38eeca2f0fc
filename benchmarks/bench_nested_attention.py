"""Nested-logit attention (Nested-TNT / CODA / RealFormer): ours against what PyTorch users run today.

Shapes (tnt-family.md §3): inner (B·196 sentences, 4 heads, 16 words, head_dim 6) at B = 256 and
outer (B, 6 heads, 197 tokens, head_dim 64) at B = 64; both forms (CODA head-MLP, RealFormer);
fp32 and bf16; forward, backward and forward+backward with upstream gradients on both outputs
(out and the logits handed to the next layer); median time (p20, p80) and peak memory.

Candidates (each gives out AND logits): eager reference, torch.compile of it, and for the
RealFormer form F.scaled_dot_product_attention / FlexAttention with the previous logits as an
additive mask plus the logits computed beside it; ours for every backend this op has here.

    python benchmarks/bench_nested_attention.py                       # GPU: the full sweep
    python benchmarks/bench_nested_attention.py --device cpu --quick  # smoke run on CPU
Writes JSON (--out, or --out-dir; rewritten after every row), prints a table, plots a PNG next to
the JSON (matplotlib, if installed). Timing, rows, JSON, table and plot: benchmarks/harness.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import harness  # benchmarks/harness.py; first: it puts the repository root on sys.path
import tntkernels

# name -> (sequences per image or None for one per image, heads, tokens, head_dim, default batches on GPU)
SHAPES = {"inner": (196, 4, 16, 6, (256,)), "outer": (None, 6, 197, 64, (64,))}
COLUMNS = [harness.column("what", "what", width=17, left=True), harness.column("shape", "shape", width=6, left=True),
           harness.column("B", "batch", width=4), harness.column("dtype", "dtype", width=8, left=True),
           harness.column("pass", "pass_", width=8, left=True), harness.column("impl", "impl", width=34, left=True),
           harness.column("median ms", "median_ms", "{:.3f}", width=10, missing="n/a"),
           harness.column("peak MiB", "peak_mib", "{:.1f}", width=9), harness.NOTE]


def implemented() -> list[str]:
    """nested_attention's backends (asked of the op on meta tensors)."""
    t = torch.empty(1, 1, 2, 2, device="meta")  # q, k, v and the previous logits (T = d = 2)
    return harness.implemented_backends(lambda b: tntkernels.nested_attention(t, t, t, t, backend=b))


def reference(q, k, v, prev, mlp):
    return tntkernels.nested_attention_ref(q, k, v, prev, mlp)


def sdpa_with_logits(q, k, v, prev, mlp):
    """RealFormer form: SDPA with the previous logits as additive mask, logits computed beside it."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + prev
    return F.scaled_dot_product_attention(q, k, v, attn_mask=prev), logits


def flex_with_logits(q, k, v, prev, mlp):
    from torch.nn.attention.flex_attention import flex_attention

    def add_prev(score, b, h, i, j):
        return score + prev[b, h, i, j]

    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + prev
    return flex_attention(q, k, v, score_mod=add_prev), logits


def candidates(form: str, device: torch.device, quick: bool, backends):
    # ours first: a run cut short by its time limit still has them (the JSON is rewritten after every row)
    for name in ("cuda", "triton", "cpu"):
        if harness.runnable(name, backends, device):
            yield f"ours_{name}", (lambda q, k, v, prev, mlp, name=name:
                                   tntkernels.nested_attention(q, k, v, prev, head_mlp=mlp, backend=name))
    yield "eager(reference)", reference
    if device.type == "cuda" or not quick:
        yield "compile(reference)", torch.compile(reference)
    if form == "realformer":
        yield "sdpa+logits", sdpa_with_logits
        if device.type == "cuda":
            yield "flex_attention(compiled)+logits", torch.compile(flex_with_logits)


def parse_args(argv=None):
    """The command line: harness.parser()'s common arguments and this benchmark's own."""
    ap = harness.parser(__doc__, shapes=SHAPES)
    ap.add_argument("--batch", type=int, nargs="+", help="images per batch (default: inner 256, outer 64 on GPU; 1 on CPU)")
    ap.add_argument("--forms", nargs="+", choices=("coda", "realformer"), default=["coda", "realformer"])
    return harness.parse(ap, argv, __file__)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    backends = implemented()
    meta = harness.environment(device, benchmark="nested_attention", backends_implemented=backends)
    gen = torch.Generator(device="cpu").manual_seed(0)
    results = harness.Results(args.out, meta, COLUMNS, plot_spec={}, budget=args.budget)
    with results:
        for shape_name in args.shapes:
            per_image, H, T, d, gpu_batches = SHAPES[shape_name]
            for B in args.batch or (gpu_batches if args.gpu else (1,)):
                S = B * (per_image or 1)
                for dtype_name in args.dtypes:
                    dtype = getattr(torch, dtype_name)

                    def rand(*shape, scale=1.0):
                        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

                    q, k, v = (rand(S, H, T, d).requires_grad_() for _ in range(3))
                    prev = rand(S, H, T, T).requires_grad_()
                    grads = (rand(S, H, T, d), rand(S, H, T, T))  # on out and on the logits
                    for form in args.forms:
                        mlp = None
                        if form == "coda":
                            shapes = ((4 * H, H), (4 * H,), (4 * H, 4 * H), (4 * H,), (H, 4 * H), (H,))
                            mlp = tuple(rand(*s, scale=0.3).requires_grad_() for s in shapes)
                        harness.measure_candidates(
                            results, dict(what=f"nested_{form}", shape=shape_name, batch=B, S=S, H=H, T=T, d=d,
                                          dtype=dtype_name),
                            candidates(form, device, args.quick, backends), (q, k, v, prev, mlp), grads, args,
                            extra=lambda impl, pas, m, out: dict(roofline_pct=None))
                    del q, k, v, prev, grads
    return results.rows


if __name__ == "__main__":
    main()

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
Writes JSON (--out), prints a table, plots a PNG next to the JSON (matplotlib, if installed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tntkernels import _backend, nested_attention  # noqa: E402
from tntkernels.ops.nested_attention import nested_attention_ref  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_inner_attention", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_inner_attention.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)  # environment, timed, peak_mib, print_table, plot

# name -> (sequences per image or None for one per image, heads, tokens, head_dim, default batches on GPU)
SHAPES = {"inner": (196, 4, 16, 6, (256,)), "outer": (None, 6, 197, 64, (64,))}


def reference(q, k, v, prev, mlp):
    return nested_attention_ref(q, k, v, prev, mlp)


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


def candidates(form: str, device: torch.device, quick: bool):
    yield "eager(reference)", reference
    if device.type == "cuda" or not quick:
        yield "compile(reference)", torch.compile(reference)
    if form == "realformer":
        yield "sdpa+logits", sdpa_with_logits
        if device.type == "cuda":
            yield "flex_attention(compiled)+logits", torch.compile(flex_with_logits)
    implemented = sys.modules["tntkernels.ops.nested_attention"]._IMPLEMENTED
    for name in ("cuda", "triton", "cpu"):
        if name in implemented and _backend.why_unavailable(name, device) is None:
            yield f"ours_{name}", (lambda q, k, v, prev, mlp, name=name:
                                   nested_attention(q, k, v, prev, head_mlp=mlp, backend=name))


def run_case(fn, inputs, grads, device, quick):
    """Rows for fwd, bwd, fwd+bwd of fn(*inputs) -> (out, logits), upstream grads on both."""
    leaves = [t for t in inputs[:4]] + list(inputs[4] or ())
    rows = {}

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        torch.autograd.backward(fn(*inputs), grads)

    def failed(exc):  # a candidate that rejects the shape is reported, not fatal
        return dict(median_ms=None, p20_ms=None, p80_ms=None, peak_mib=None,
                    note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")

    try:
        outs = fn(*inputs)
    except Exception as exc:
        return {pas: failed(exc) for pas in ("fwd", "bwd", "fwd+bwd")}

    def bwd():
        torch.autograd.backward(outs, grads, retain_graph=True)

    for pas, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        try:
            med, p20, p80 = common.timed(f, device, quick)
            rows[pas] = dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mib=common.peak_mib(f, device), note="")
        except Exception as exc:
            rows[pas] = failed(exc)
        for t in leaves:
            t.grad = None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", help="images per batch (default: inner 256, outer 64 on GPU; 1 on CPU)")
    ap.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: float32 bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    ap.add_argument("--forms", nargs="+", choices=("coda", "realformer"), default=["coda", "realformer"])
    ap.add_argument("--quick", action="store_true", help="short timings, no torch.compile on CPU (smoke runs)")
    ap.add_argument("--out", help="JSON file to write (a PNG plot is written next to it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    meta = common.environment(device)
    print(json.dumps(meta))
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape_name in args.shapes:
        per_image, H, T, d, gpu_batches = SHAPES[shape_name]
        for B in args.batch or (gpu_batches if device.type == "cuda" else (1,)):
            S = B * (per_image or 1)
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)

                def rand(*shape, scale=1.0):
                    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

                q, k, v = (rand(S, H, T, d).requires_grad_() for _ in range(3))
                prev = rand(S, H, T, T).requires_grad_()
                grads = (rand(S, H, T, d), rand(S, H, T, T))
                for form in args.forms:
                    mlp = None
                    if form == "coda":
                        shapes = ((4 * H, H), (4 * H,), (4 * H, 4 * H), (4 * H,), (H, 4 * H), (H,))
                        mlp = tuple(rand(*s, scale=0.3).requires_grad_() for s in shapes)
                    for name, fn in candidates(form, device, args.quick):
                        for pas, r in run_case(fn, (q, k, v, prev, mlp), grads, device, args.quick).items():
                            rows.append(dict(what=f"nested_{form}", shape=shape_name, batch=B, S=S, H=H, T=T, d=d,
                                             dtype=dtype_name, impl=name, pass_=pas, roofline_pct=None, **r))
                del q, k, v, prev, grads
    common.print_table(rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
        common.plot(rows, os.path.splitext(args.out)[0] + ".png", meta)
    return rows


if __name__ == "__main__":
    main()

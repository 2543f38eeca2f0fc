"""Inner attention and the TNT inner sub-block: ours against what PyTorch users run today.

Shapes (landscape.md §2): TNT-S (S = B·196 sentences, 4 heads, 16 words, head_dim 6) and TNT-B
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
Writes JSON (--out), prints a table, and plots a PNG next to the JSON (matplotlib, if installed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tntkernels  # noqa: E402
from tntkernels import _backend, inner_attention  # noqa: E402
from tntkernels.nn import Attention, Mlp, fused_inner_sublayer  # noqa: E402

SHAPES = {"tnt_s": dict(dim=24, heads=4, words=16), "tnt_b": dict(dim=40, heads=4, words=16)}


def environment(device: torch.device) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, tntkernels=tntkernels.__version__, commit=commit,
               python=platform.python_version(), threads=torch.get_num_threads())
    if _backend.triton_importable():
        import triton
        env["triton"] = triton.__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def timed(fn, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() after warm-up."""
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25 if quick else 100,
                                                rep=50 if quick else 300)
        return med, p20, p80
    for _ in range(2):
        fn()
    times = []
    budget = 0.3 if quick else 2.0
    start = time.perf_counter()
    while time.perf_counter() - start < budget or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), the roofline's slope."""
    if device.type != "cuda":
        return None
    import triton.testing
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    return 2 * x.numel() / (ms * 1e-3)


# ------------------------------------------------------------------ attention candidates

def timm_eager(q, k, v):
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (S, H, m, m)
    return attn.softmax(dim=-1) @ v


def flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v)


def attention_candidates(device: torch.device, quick: bool):
    yield "timm_eager", timm_eager
    yield "sdpa", F.scaled_dot_product_attention
    if device.type == "cuda" or not quick:
        yield "compile(timm_eager)", torch.compile(timm_eager)
        if device.type == "cuda":
            yield "compile-max-autotune(timm_eager)", torch.compile(timm_eager, mode="max-autotune-no-cudagraphs")
            yield "flex_attention(compiled)", torch.compile(flex)
    for name in ("cuda", "triton", "cpu"):
        if _backend.why_unavailable(name, device) is None and name in _implemented():
            yield f"ours_{name}", (lambda q, k, v, name=name: inner_attention(q, k, v, backend=name))


def _implemented():
    return sys.modules["tntkernels.ops.inner_attention"]._IMPLEMENTED


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


def block_candidates(dim, heads, device, dtype, quick):
    try:
        from timm.models.tnt import Attention as TimmAttention
    except ImportError:
        TimmAttention = None
    if TimmAttention is not None:
        timm_block = InnerBlock(dim, heads, TimmAttention(dim, dim, num_heads=heads)).to(device, dtype)
        yield "timm_eager", timm_block
        if device.type == "cuda" or not quick:
            yield "compile(timm)", torch.compile(timm_block)
    for name in ("cuda", "triton", "cpu"):
        if _backend.why_unavailable(name, device) is None and name in _implemented():
            yield f"ours_{name}", InnerBlock(dim, heads, Attention(dim, dim, num_heads=heads, backend=name)).to(device, dtype)
    if _backend.why_unavailable("triton", device) is None:
        yield "ours_fused_triton", InnerBlock(dim, heads, Attention(dim, dim, num_heads=heads, backend="triton"),
                                              fused=True).to(device, dtype)


# ------------------------------------------------------------------ driver

def run_case(fn_fwd, inputs, grad, device, quick):
    """Rows for fwd, bwd, fwd+bwd of fn_fwd(*inputs) (inputs require grad)."""
    rows = {}

    def fwd():
        with torch.no_grad():
            fn_fwd(*inputs)

    def fwd_bwd():
        fn_fwd(*inputs).backward(grad)

    out = fn_fwd(*inputs)

    def bwd():
        out.backward(grad, retain_graph=True)

    for pas, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        try:
            med, p20, p80 = timed(fn, device, quick)
            rows[pas] = dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mib=peak_mib(fn, device), note="")
        except Exception as exc:  # a baseline that rejects the shape is reported, not fatal
            rows[pas] = dict(median_ms=None, p20_ms=None, p80_ms=None, peak_mib=None,
                             note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        for t in inputs:
            t.grad = None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", help="images per batch (default 64 256 on GPU, 2 on CPU)")
    ap.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: float32 bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    ap.add_argument("--what", nargs="+", choices=("attention", "block"), default=["attention", "block"])
    ap.add_argument("--quick", action="store_true", help="short timings, no torch.compile on CPU (smoke runs)")
    ap.add_argument("--out", help="JSON file to write (a PNG plot is written next to it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batches = args.batch or ([64, 256] if device.type == "cuda" else [2])
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    bandwidth = copy_bandwidth(device)
    meta = dict(environment(device), copy_bandwidth_GBps=bandwidth / 1e9 if bandwidth else None)
    print(json.dumps(meta))
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape_name in args.shapes:
        dim, H, m = SHAPES[shape_name]["dim"], SHAPES[shape_name]["heads"], SHAPES[shape_name]["words"]
        d = dim // H
        for B in batches:
            S = B * 196
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                elem = torch.finfo(dtype).bits // 8
                if "attention" in args.what:
                    q, k, v = (torch.randn(S, H, m, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
                    grad = torch.randn(S, H, m, d, generator=gen).to(device, dtype)
                    for name, fn in attention_candidates(device, args.quick):
                        for pas, r in run_case(fn, (q, k, v), grad, device, args.quick).items():
                            ideal = (attention_bytes(S, H, m, d, elem, pas) / bandwidth * 1e3) if bandwidth else None
                            rows.append(dict(what="attention", shape=shape_name, batch=B, S=S, H=H, m=m, d=d,
                                             dtype=dtype_name, impl=name, pass_=pas, **r,
                                             roofline_pct=(100 * ideal / r["median_ms"]) if ideal and r["median_ms"] and name.startswith("ours") else None))
                    del q, k, v, grad
                if "block" in args.what:
                    x = torch.randn(S, m, dim, generator=gen).to(device, dtype).requires_grad_()
                    grad = torch.randn(S, m, dim, generator=gen).to(device, dtype)
                    torch.manual_seed(0)
                    for name, block in block_candidates(dim, H, device, dtype, args.quick):
                        for pas, r in run_case(block, (x,), grad, device, args.quick).items():
                            ideal = (2 * S * m * dim * elem * (1 if pas == "fwd" else 2 if pas == "bwd" else 3)
                                     / bandwidth * 1e3) if bandwidth else None  # read tokens once, write once
                            rows.append(dict(what="inner_block", shape=shape_name, batch=B, S=S, H=H, m=m, d=d,
                                             dtype=dtype_name, impl=name, pass_=pas, **r,
                                             roofline_pct=(100 * ideal / r["median_ms"]) if ideal and r["median_ms"] and name.startswith("ours") else None))
                    del x, grad
    print_table(rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
        plot(rows, os.path.splitext(args.out)[0] + ".png", meta)
    return rows


def print_table(rows):
    print(f"{'what':11s} {'shape':6s} {'B':>4s} {'dtype':8s} {'pass':8s} {'impl':34s} {'median ms':>10s} "
          f"{'peak MiB':>9s} {'roofline':>8s}  note")
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if r["median_ms"] is not None else "n/a"
        mem = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        roof = f"{r['roofline_pct']:.0f}%" if r["roofline_pct"] is not None else "-"
        print(f"{r['what']:11s} {r['shape']:6s} {r['batch']:4d} {r['dtype']:8s} {r['pass_']:8s} {r['impl']:34s} "
              f"{ms:>10s} {mem:>9s} {roof:>8s}  {r['note']}")


def plot(rows, path, meta):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    cases = sorted({(r["what"], r["shape"], r["batch"], r["dtype"]) for r in rows if r["pass_"] == "fwd+bwd"})
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, 2.2 * len(cases) + 0.5), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        sel = [r for r in rows if (r["what"], r["shape"], r["batch"], r["dtype"]) == case and r["pass_"] == "fwd+bwd"
               and r["median_ms"] is not None]
        ax.barh([r["impl"] for r in sel], [r["median_ms"] for r in sel],
                color=["tab:green" if r["impl"].startswith("ours") else "tab:gray" for r in sel])
        ax.set_title(f"{case[0]} {case[1]} B={case[2]} {case[3]} fwd+bwd (ms, lower is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{meta.get('gpu') or meta.get('cpu')} · torch {meta['torch']} · commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

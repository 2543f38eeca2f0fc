"""Microbenchmark of inner attention: ours against what PyTorch users run today.

Shapes: TNT-S (S = B·196 sentences, 4 heads, 16 words, head_dim 6) and TNT-B (head_dim 10).
Baselines: timm's eager formula (materialized logits), F.scaled_dot_product_attention; ours: every
compiled backend available on the device. Forward and forward+backward, median time of repeated
runs (torch.utils.benchmark), written as JSON rows with the device and versions.

    python benchmarks/bench_inner_attention.py --device cpu --batch 8 --out benchmarks/results/cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import tntkernels
from tntkernels import _backend, inner_attention

SHAPES = {"tnt_s": (4, 16, 6), "tnt_b": (4, 16, 10)}  # heads, words, head_dim


def timm_eager(q, k, v):
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def candidates(device):
    yield "timm_eager", timm_eager
    yield "sdpa", F.scaled_dot_product_attention
    for name in ("cpu", "cuda", "triton"):
        try:
            _backend.resolve("inner_attention", name, device, sys_impl(), {})
        except RuntimeError:
            continue
        yield f"ours_{name}", lambda q, k, v, name=name: inner_attention(q, k, v, backend=name)


def sys_impl():
    import sys
    return sys.modules["tntkernels.ops.inner_attention"]._IMPLEMENTED


def measure(fn, q, k, v, backward: bool) -> float:
    def step():
        out = fn(q, k, v)
        if backward:
            out.backward(grad)
    grad = torch.randn_like(q[..., :v.shape[-1]]) if backward else None
    t = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=1.0)
    return t.median * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="images per batch (default: 8 on CPU, 64 256 on GPU)")
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = args.batch or ([8] if device.type == "cpu" else [64, 256])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, tntkernels=tntkernels.__version__,
                commit=commit)
    rows = []
    for shape_name, (H, m, d) in SHAPES.items():
        for B in batches:
            for dtype_name in args.dtype:
                dtype = getattr(torch, dtype_name)
                q, k, v = (torch.randn(B * 196, H, m, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                for name, fn in candidates(device):
                    for pas, bwd in (("fwd", False), ("fwd+bwd", True)):
                        try:
                            ms = measure(fn, q, k, v, bwd)
                        except RuntimeError as exc:  # a baseline that rejects the shape is reported, not fatal
                            ms, note = None, str(exc).splitlines()[0][:120]
                        else:
                            note = ""
                        rows.append(dict(shape=shape_name, batch=B, S=B * 196, H=H, m=m, d=d, dtype=dtype_name,
                                         impl=name, pass_=pas, median_ms=ms, note=note))
                        print(f"{shape_name} B={B:4d} {dtype_name:8s} {pas:8s} {name:12s} "
                              f"{'%.3f ms' % ms if ms is not None else 'n/a  ' + note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

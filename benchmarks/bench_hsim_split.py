"""TinT's H_sim-split linear op (tint.md §1): ours against the forms TinT and PyTorch users run.

    z[n, g, k] = Σ_h x[n, h, k] M[k, h, g] + m[k, g];     y[n, g, :] = z[n, g, :] @ A[g] + a[g]
    x (N, D), D = H·d; M (d, H, H), m (d, H); A (H, d, d), a (H, d)

Shapes: D_sim 3072, H 12 (TinT built for OPT-125M) and D_sim 768, H 12; N = 1280, 2304, 8192 rows
(GPU default; on CPU the default is one tiny case, D 768 and N 64); fp32 and bf16 on GPU, fp32 on
CPU; forward, backward (w.r.t. x and all four parameters, random upstream gradient; the timed
backward sets .grad to None first, as a training step does) and forward+backward.

Candidates (all return y of shape (N, D)):
  tint_reference_form        the structure of TinT's `Conv2D` (tint_main/utils/modules.py): the
                             mix as an einsum plus `.contiguous()`, the block part as a Python loop
                             of H per-head matmuls, `torch.stack`, bias adds;
  compile(tint_reference_form)  torch.compile of it (on CPU only without --quick);
  bmm                        mix via einsum, block via one torch.bmm over heads;
  dense_gemm                 one addmm with the equivalent dense weight
                             W_dense[(h,k),(g,j)] = M[k,h,g]·A[g][k,j] (D × D) and bias
                             b[g,j] = Σ_k m[k,g] A[g][k,j] + a[g,j], built outside the timed region
                             (its backward yields dW_dense, not dM/dA: a lower bound for "use a
                             dense layer instead");
  ours_<backend>             tntkernels.hsim_split_linear(..., backend=b) for every backend of
                             the op available on the device (triton is skipped on CPU: its
                             interpreter is a test tool, not a timing).

Per row: median / p20 / p80 ms, peak MiB (CUDA: allocated above the baseline), useful TFLOP/s and
GB/s, % of the memory roofline (minimal bytes / measured copy bandwidth) and % of the compute
roofline (useful FLOPs / measured dense GEMM rate of the dtype, an 8192³ torch.matmul at the
current float32 matmul precision, recorded in meta), and roofline_pct = the larger of the two
floors over the measured time. The counts (same for every candidate, so TFLOP/s and GB/s are
inverse times on one scale):
  FLOPs  fwd 2·N·D·H (mix) + 2·N·D·d (block) = 2·N·D·(H+d); bwd 2× fwd (dx through block and mix,
         dA and dM; bias sums ignored); fwd+bwd 3× fwd. dense_gemm executes 2·N·D² instead
         (`executed_flops`): 11.5× more for D 3072, H 12.
  bytes  P = d·H² + d·H + H·d² + H·d weights, e = element size:
         fwd (2·N·D + P)·e: x read, y written, weights read;
         bwd (3·N·D + 2·P)·e: dy and x read, dx written, weights read, weight grads written;
         fwd+bwd: their sum.

    python benchmarks/bench_hsim_split.py                        # GPU: the full sweep
    python benchmarks/bench_hsim_split.py --device cpu --quick --threads 1   # smoke run on CPU
Writes JSON (--out: meta + rows), prints a table, plots a PNG next to the JSON (matplotlib, if
installed; the plot's "B=" is N rows).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tntkernels  # noqa: E402
from tntkernels import _backend  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_inner_attention", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_inner_attention.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)  # environment, timed, peak_mib, copy_bandwidth, plot

# name -> (D, H)
SHAPES = {"tint_opt125m": (3072, 12), "d768": (768, 12)}
GPU_ROWS = (1280, 2304, 8192)
CPU_ROWS = (64,)
CPU_SHAPES = ("d768",)
PASSES = ("fwd", "bwd", "fwd+bwd")


# ------------------------------------------------------------------ candidates

def tint_reference_form(x, M, m, A, a):
    """The structure of TinT's Conv2D pair: einsum mix + .contiguous(), then a per-head loop."""
    N, D = x.shape
    d, H = M.shape[0], M.shape[1]
    # mix, as TinT's transposed Conv2D with use_einsum: weight viewed (g, h, k), bias viewed (g, k)
    z = torch.einsum("nhk,ghk->ngk", x.view(N, H, d), M.transpose(0, 2)) + m.transpose(0, 1)
    z = z.contiguous().view(N, D)
    # block, as TinT's plain Conv2D: one matmul per head, stacked, then the bias
    z = z.view(N, H, d)
    y = torch.stack([z[:, g] @ A[g] for g in range(H)], dim=1) + a
    return y.view(N, D)


def bmm_form(x, M, m, A, a):
    """Batched: mix via einsum, block via one torch.bmm over the heads."""
    N, D = x.shape
    d, H = M.shape[0], M.shape[1]
    z = torch.einsum("nhk,khg->gnk", x.view(N, H, d), M) + m.t().unsqueeze(1)  # (H, N, d)
    y = torch.baddbmm(a.unsqueeze(1), z, A)  # (H, N, d)
    return y.transpose(0, 1).reshape(N, D)


def dense_weight(M, m, A, a):
    """(W (D, D), b (D,)) with x @ W + b == Block(Mix(x))."""
    d, H = M.shape[0], M.shape[1]
    W = torch.einsum("khg,gkj->hkgj", M, A).reshape(H * d, H * d)
    b = (torch.einsum("kg,gkj->gj", m, A) + a).reshape(H * d)
    return W, b


def dense_gemm(x, W, b):
    return torch.addmm(b, x, W)


def _implemented():
    return sys.modules["tntkernels.ops.hsim_split"]._IMPLEMENTED


def candidates(device: torch.device, quick: bool):
    """(name, fn, which) with which = "split" (fn(x, M, m, A, a)) or "dense" (fn(x, W, b))."""
    yield "tint_reference_form", tint_reference_form, "split"
    if device.type == "cuda" or not quick:
        # one fresh compile per case: dynamo caches per code object, and 12 cases × grad modes
        # would pass its recompile limit and fall back to eager silently
        torch._dynamo.reset()
        yield "compile(tint_reference_form)", torch.compile(tint_reference_form, dynamic=False), "split"
    yield "bmm", bmm_form, "split"
    yield "dense_gemm", dense_gemm, "dense"
    for name in ("reference", "cuda", "triton", "cpu"):
        if name not in _implemented() or _backend.why_unavailable(name, device) is not None:
            continue
        if name == "triton" and device.type != "cuda":
            continue  # TRITON_INTERPRET runs numpy: a test tool, not a timing
        yield f"ours_{name}", (lambda x, M, m, A, a, name=name:
                               tntkernels.hsim_split_linear(x, M, m, A, a, backend=name)), "split"


# ------------------------------------------------------------------ counts and rooflines

def op_flops(N, D, H, pas):
    d = D // H
    fwd = 2 * N * D * (H + d)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[pas]


def dense_flops(N, D, pas):
    fwd = 2 * N * D * D
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[pas]


def op_bytes(N, D, H, elem, pas):
    d = D // H
    P = d * H * H + d * H + H * d * d + H * d
    fwd = (2 * N * D + P) * elem
    bwd = (3 * N * D + 2 * P) * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pas]


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float | None:
    """Measured dense GEMM rate in FLOP/s (8192³ torch.matmul), the compute roofline's roof."""
    if device.type != "cuda":
        return None
    import triton.testing
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * n ** 3 / (ms * 1e-3)


# ------------------------------------------------------------------ driver

def _failed(exc):  # a candidate that rejects the shape is reported, not fatal
    return dict(median_ms=None, p20_ms=None, p80_ms=None, peak_mib=None,
                note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")


def run_case(fn, inputs, grad, device, quick):
    """Rows for fwd, bwd, fwd+bwd of fn(*inputs) (every input a leaf requiring grad)."""

    def clear():
        for t in inputs:
            t.grad = None

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        clear()
        fn(*inputs).backward(grad)

    try:
        out = fn(*inputs)
    except Exception as exc:
        return {pas: _failed(exc) for pas in PASSES}, None

    def bwd():
        clear()
        out.backward(grad, retain_graph=True)

    rows = {}
    for pas, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        try:
            med, p20, p80 = common.timed(f, device, quick)
            rows[pas] = dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mib=common.peak_mib(f, device), note="")
        except Exception as exc:
            rows[pas] = _failed(exc)
        clear()
    return rows, out.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, nargs="+",
                    help=f"N, rows of x (default {' '.join(map(str, GPU_ROWS))} on GPU, "
                         f"{' '.join(map(str, CPU_ROWS))} on CPU)")
    ap.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: float32 bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=None,
                    help=f"(D, H) cases {SHAPES}; default all on GPU, {' '.join(CPU_SHAPES)} on CPU")
    ap.add_argument("--quick", action="store_true", help="short timings, no torch.compile on CPU (smoke runs)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's choice; 1 avoids "
                                                 "OpenMP barrier stalls on an oversubscribed machine)")
    ap.add_argument("--out", help="JSON file to write (a PNG plot is written next to it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_n = args.rows or (GPU_ROWS if on_gpu else CPU_ROWS)
    shapes = args.shapes or (list(SHAPES) if on_gpu else list(CPU_SHAPES))
    dtypes = args.dtype or (["float32", "bfloat16"] if on_gpu else ["float32"])
    bandwidth = common.copy_bandwidth(device)
    rates = {name: gemm_rate(device, getattr(torch, name)) for name in dtypes}
    meta = dict(common.environment(device), copy_bandwidth_GBps=bandwidth / 1e9 if bandwidth else None,
                gemm_TFLOPs={k: (v / 1e12 if v else None) for k, v in rates.items()},
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                backends_implemented=sorted(_implemented()))
    print(json.dumps(meta))
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape_name in shapes:
        D, H = SHAPES[shape_name]
        d = D // H
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            elem = torch.finfo(dtype).bits // 8

            def rand(*shape, scale=1.0):
                return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

            M, m = rand(d, H, H, scale=H ** -0.5), rand(d, H, scale=0.1)
            A, a = rand(H, d, d, scale=d ** -0.5), rand(H, d, scale=0.1)
            W, b = dense_weight(M, m, A, a)
            split = [t.requires_grad_() for t in (M, m, A, a)]
            dense = [t.requires_grad_() for t in (W, b)]
            for N in rows_n:
                x = rand(N, D).requires_grad_()
                grad = rand(N, D)
                with torch.no_grad():  # fp64 oracle for a sanity check of every candidate's output
                    exact = tntkernels.hsim_split_linear_ref(*(t.double() for t in (x, *split)))
                for name, fn, which in candidates(device, args.quick):
                    inputs = (x, *split) if which == "split" else (x, *dense)
                    results, out = run_case(fn, inputs, grad, device, args.quick)
                    err = (out.double() - exact).abs().max().item() if out is not None else None
                    for pas, r in results.items():
                        flops, nbytes = op_flops(N, D, H, pas), op_bytes(N, D, H, elem, pas)
                        t = r["median_ms"] * 1e-3 if r["median_ms"] else None
                        mem_floor = nbytes / bandwidth if bandwidth else None
                        cmp_floor = flops / rates[dtype_name] if rates[dtype_name] else None
                        floors = [f for f in (mem_floor, cmp_floor) if f is not None]
                        rows.append(dict(
                            what="hsim_split", shape=shape_name, batch=N, N=N, D=D, H=H, d=d, dtype=dtype_name,
                            impl=name, pass_=pas, **r, max_abs_err=err, flops=flops,
                            executed_flops=dense_flops(N, D, pas) if which == "dense" else flops, bytes=nbytes,
                            tflops=flops / t / 1e12 if t else None, gbps=nbytes / t / 1e9 if t else None,
                            mem_roofline_pct=100 * mem_floor / t if t and mem_floor else None,
                            compute_roofline_pct=100 * cmp_floor / t if t and cmp_floor else None,
                            roofline_pct=100 * max(floors) / t if t and floors else None))
                    del out
                del x, grad, exact
            del M, m, A, a, W, b, split, dense
    print_table(rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
        common.plot(rows, os.path.splitext(args.out)[0] + ".png", meta)
    return rows


def print_table(rows):
    fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
    print(f"{'shape':12s} {'N':>5s} {'dtype':8s} {'pass':8s} {'impl':29s} {'median ms':>10s} {'p20':>9s} "
          f"{'p80':>9s} {'peak MiB':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'%mem':>5s} {'%flop':>5s} {'maxerr':>8s}  note")
    for r in rows:
        print(f"{r['shape']:12s} {r['N']:5d} {r['dtype']:8s} {r['pass_']:8s} {r['impl']:29s} "
              f"{fmt(r['median_ms'], '%.4f'):>10s} {fmt(r['p20_ms'], '%.4f'):>9s} {fmt(r['p80_ms'], '%.4f'):>9s} "
              f"{fmt(r['peak_mib'], '%.1f'):>9s} {fmt(r['tflops'], '%.3f'):>8s} {fmt(r['gbps'], '%.1f'):>7s} "
              f"{fmt(r['mem_roofline_pct'], '%.0f'):>5s} {fmt(r['compute_roofline_pct'], '%.0f'):>5s} "
              f"{fmt(r['max_abs_err'], '%.1e'):>8s}  {r['note']}")


if __name__ == "__main__":
    main()

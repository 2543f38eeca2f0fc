"""TinT's H_sim-split linear op (docs/tint.md §1): ours against the forms TinT and PyTorch users run.

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
Writes JSON (--out, or --out-dir: meta + rows, rewritten after every row), prints a table, plots a
PNG next to the JSON (matplotlib, if installed; the plot's "B=" is N rows). Timing, rows, JSON, table
and plot: benchmarks/harness.py.
"""
from __future__ import annotations

import torch

import harness  # benchmarks/harness.py; first: it puts the repository root on sys.path
import tntkernels

# name -> (D, H)
SHAPES = {"tint_opt125m": (3072, 12), "d768": (768, 12)}
GPU_ROWS = (1280, 2304, 8192)
CPU_ROWS = (64,)
CPU_SHAPES = ("d768",)
COLUMNS = [harness.column("shape", "shape", width=12, left=True), harness.column("N", "N", width=5),
           harness.column("dtype", "dtype", width=8, left=True), harness.column("pass", "pass_", width=8, left=True),
           harness.column("impl", "impl", width=29, left=True),
           harness.column("median ms", "median_ms", "{:.4f}", width=10), harness.column("p20", "p20_ms", "{:.4f}", width=9),
           harness.column("p80", "p80_ms", "{:.4f}", width=9), harness.column("peak MiB", "peak_mib", "{:.1f}", width=9),
           harness.column("TFLOP/s", "tflops", "{:.3f}", width=8), harness.column("GB/s", "gbps", "{:.1f}", width=7),
           harness.column("%mem", "mem_roofline_pct", "{:.0f}", width=5),
           harness.column("%flop", "compute_roofline_pct", "{:.0f}", width=5),
           harness.column("maxerr", "max_abs_err", "{:.1e}", width=8), harness.NOTE]


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


def implemented() -> list[str]:
    """hsim_split_linear's backends (asked of the op on meta tensors: D = 4, H = d = 2)."""
    x, w, b = (torch.empty(*s, device="meta") for s in ((1, 4), (2, 2, 2), (2, 2)))
    return harness.implemented_backends(lambda name: tntkernels.hsim_split_linear(x, w, b, w, b, backend=name))


def candidates(device: torch.device, quick: bool, backends):
    """(name, fn, which) with which = "split" (fn(x, M, m, A, a)) or "dense" (fn(x, W, b)); ours first
    (a run cut short by its time limit still has them)."""
    for name in ("reference", "cuda", "triton", "cpu"):
        if not harness.runnable(name, backends, device):
            continue
        if name == "triton" and device.type != "cuda":
            continue  # TRITON_INTERPRET runs numpy: a test tool, not a timing
        yield f"ours_{name}", (lambda x, M, m, A, a, name=name:
                               tntkernels.hsim_split_linear(x, M, m, A, a, backend=name)), "split"
    yield "tint_reference_form", tint_reference_form, "split"
    if device.type == "cuda" or not quick:
        # one fresh compile per case: dynamo caches per code object, and 12 cases × grad modes
        # would pass its recompile limit and fall back to eager silently
        torch._dynamo.reset()
        yield "compile(tint_reference_form)", torch.compile(tint_reference_form, dynamic=False), "split"
    yield "bmm", bmm_form, "split"
    yield "dense_gemm", dense_gemm, "dense"


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


# ------------------------------------------------------------------ driver

def parse_args(argv=None):
    """The command line: harness.parser()'s common arguments and this benchmark's own."""
    ap = harness.parser(__doc__, shapes=SHAPES, shapes_default=[],
                        shapes_help=f"(D, H) cases {SHAPES}; default all on GPU, {' '.join(CPU_SHAPES)} on CPU")
    ap.add_argument("--rows", type=int, nargs="+",
                    help=f"N, rows of x (default {' '.join(map(str, GPU_ROWS))} on GPU, "
                         f"{' '.join(map(str, CPU_ROWS))} on CPU)")
    return harness.parse(ap, argv, __file__)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    rows_n = args.rows or (GPU_ROWS if args.gpu else CPU_ROWS)
    shapes = args.shapes or (list(SHAPES) if args.gpu else list(CPU_SHAPES))
    backends = implemented()
    bandwidth = harness.copy_bandwidth(device)
    rates = {name: harness.gemm_rate(device, getattr(torch, name)) for name in args.dtypes}
    meta = harness.environment(device, benchmark="hsim_split", copy_bandwidth_GBps=bandwidth / 1e9 if bandwidth else None,
                               gemm_TFLOPs={k: (v / 1e12 if v else None) for k, v in rates.items()},
                               float32_matmul_precision=torch.get_float32_matmul_precision(),
                               backends_implemented=backends)
    gen = torch.Generator(device="cpu").manual_seed(0)
    results = harness.Results(args.out, meta, COLUMNS, plot_spec={}, budget=args.budget)
    with results:
        for shape_name in shapes:
            D, H = SHAPES[shape_name]
            d = D // H
            for dtype_name in args.dtypes:
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
                    cands = ((name, fn, (x, *split) if which == "split" else (x, *dense))
                             for name, fn, which in candidates(device, args.quick, backends))

                    def extra(impl, pas, r, out):
                        flops, nbytes = op_flops(N, D, H, pas), op_bytes(N, D, H, elem, pas)
                        t = r["median_ms"] * 1e-3 if r["median_ms"] else None
                        mem = harness.floor_pct(r["median_ms"], nbytes, bandwidth)
                        cmp = harness.floor_pct(r["median_ms"], flops, rates[dtype_name])
                        floors = [p for p in (mem, cmp) if p is not None]
                        return dict(max_abs_err=(out.double() - exact).abs().max().item() if out is not None else None,
                                    flops=flops,
                                    executed_flops=dense_flops(N, D, pas) if impl == "dense_gemm" else flops,
                                    bytes=nbytes, tflops=flops / t / 1e12 if t else None,
                                    gbps=nbytes / t / 1e9 if t else None, mem_roofline_pct=mem,
                                    compute_roofline_pct=cmp, roofline_pct=max(floors) if floors else None)

                    case = dict(what="hsim_split", shape=shape_name, batch=N, N=N, D=D, H=H, d=d, dtype=dtype_name)
                    harness.measure_candidates(results, case, cands, None, grad, args, extra=extra)
                    del x, grad, exact, cands
                del M, m, A, a, W, b, split, dense
    return results.rows


if __name__ == "__main__":
    main()

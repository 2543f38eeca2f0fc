"""The C++ CPU ops against the best PyTorch path, side by side: the CPU table of the README.

Every row times forward + backward in float32 (gradients of every input, a fixed random upstream
gradient) for ours (`backend="cpu"`, the C++ op) and each PyTorch candidate, interleaved: round r
runs every candidate once, in order, so a machine slowing down mid-run slows them all alike. The
median of the rounds is reported, and ratio = (best PyTorch median) / (ours): > 1 means ours is
faster. Candidates that compute another op (the dense nn.Linear beside H_sim-split) are timed for
context, not counted in the ratio. The ops are also timed with `backend=None` (what a user gets by
default: the registry's CPU order and fit checks), which should be about as fast as the better of
ours and PyTorch's.

Rows (docs/baselines.md): inner attention at TNT-S, batch 8 (S 1,568 sentences, 4 heads, 16 words,
head_dim 6): ours vs timm's eager attention and F.scaled_dot_product_attention; nested attention
(RealFormer and CODA forms) at the inner shape (B 1,568, H 4, T 16, d 6) and the outer one (B 8,
H 6, T 197, d 64): ours vs the reference (`nested_attention_ref`, PyTorch batched GEMMs); H_sim-split
at N 2,304, D 768, H 12: ours vs the reference and the dense nn.Linear; a TNT-S training step at
batch 8, 224² (AdamW, cross-entropy): `tntkernels.models.create_model` (backend=None) vs timm.

    python benchmarks/bench_cpu.py --threads 2                  # the README table (about 5 minutes)
    python benchmarks/bench_cpu.py --quick                      # small shapes, 3 rounds (smoke run)
Writes JSON (--out / --out-dir, rewritten after every row; benchmarks/harness.py) and prints a text
table and the Markdown one.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import harness  # benchmarks/harness.py; first: it puts the repository root on sys.path
import tntkernels
from tntkernels import hsim_split_linear_ref, nested_attention_ref


def _leaves(*shapes, gen):
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def _fwd_bwd(fn: Callable, leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of fn(*leaves) against `grad` (the gradients of every leaf)."""
    def step():
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, leaves, grad)
    return step


def _eager(q, k, v):  # timm's TNT Attention
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return attn.softmax(dim=-1) @ v


def inner_attention_row(S, H, m, d, gen):
    leaves = _leaves(*[(S, H, m, d)] * 3, gen=gen)
    grad = torch.randn(S, H, m, d, generator=gen)
    return dict(op="inner_attention", shape=f"S {S}, H {H}, m {m}, d {d}",
                ours=_fwd_bwd(lambda q, k, v: tntkernels.inner_attention(q, k, v, backend="cpu"), leaves, grad),
                auto=_fwd_bwd(lambda q, k, v: tntkernels.inner_attention(q, k, v), leaves, grad),
                pytorch={"eager": _fwd_bwd(_eager, leaves, grad),
                         "sdpa": _fwd_bwd(F.scaled_dot_product_attention, leaves, grad)})


def nested_attention_row(B, H, T, d, form, gen):
    q, k, v = _leaves(*[(B, H, T, d)] * 3, gen=gen)
    prev = torch.randn(B, H, T, T, generator=gen).requires_grad_()
    leaves = [q, k, v, prev]
    mlp = None
    if form == "coda":
        F4 = 4 * H
        mlp = tuple(t.requires_grad_() for t in (torch.randn(F4, H, generator=gen) * H ** -0.5, torch.zeros(F4),
                                                 torch.randn(F4, F4, generator=gen) * F4 ** -0.5, torch.zeros(F4),
                                                 torch.randn(H, F4, generator=gen) * F4 ** -0.5, torch.zeros(H)))
        leaves += list(mlp)
    grad = torch.randn(B, H, T, d, generator=gen)

    def ours(q, k, v, p, *w, backend="cpu"):
        return tntkernels.nested_attention(q, k, v, p, head_mlp=tuple(w) or None, backend=backend)

    def ref(q, k, v, p, *w):
        return nested_attention_ref(q, k, v, p, tuple(w) or None)

    return dict(op=f"nested_attention {form}", shape=f"B {B}, H {H}, T {T}, d {d}", ours=_fwd_bwd(ours, leaves, grad),
                auto=_fwd_bwd(lambda *a: ours(*a, backend=None), leaves, grad),
                pytorch={"reference": _fwd_bwd(ref, leaves, grad)})


def hsim_row(N, D, H, gen):
    d = D // H
    x = torch.randn(N, D, generator=gen).requires_grad_()
    params = [(torch.randn(d, H, H, generator=gen) * H ** -0.5).requires_grad_(), torch.zeros(d, H).requires_grad_(),
              (torch.randn(H, d, d, generator=gen) * d ** -0.5).requires_grad_(), torch.zeros(H, d).requires_grad_()]
    grad = torch.randn(N, D, generator=gen)
    dense = torch.nn.Linear(D, D)
    leaves = [x, *params]
    return dict(op="hsim_split_linear", shape=f"N {N}, D {D}, H {H}",
                ours=_fwd_bwd(lambda *a: tntkernels.hsim_split_linear(*a, backend="cpu"), leaves, grad),
                auto=_fwd_bwd(lambda *a: tntkernels.hsim_split_linear(*a), leaves, grad),
                pytorch={"reference": _fwd_bwd(hsim_split_linear_ref, leaves, grad)},
                context={"dense nn.Linear": _fwd_bwd(dense, [x], grad)})


def train_row(batch, img, gen):
    import timm

    from tntkernels.models import create_model

    x = torch.randn(batch, 3, img, img, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)

    def stepper(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    kw = dict(img_size=img) if img != 224 else {}
    ours = create_model("tnt_s_patch16_224", **kw)
    theirs = timm.create_model("tnt_s_patch16_224", pretrained=False, **kw)
    return dict(op="TNT-S training step", shape=f"B {batch}, {img}²", ours=stepper(ours), pytorch={"timm": stepper(theirs)})


def measure(row: dict, rounds: int, warmup: int) -> dict:
    """Interleaved rounds; medians in ms, ratio = best PyTorch / ours."""
    candidates = {"ours": row["ours"], **({"auto": row["auto"]} if "auto" in row else {}), **row["pytorch"],
                  **row.get("context", {})}
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    best = min(row["pytorch"], key=med.get)
    return dict(op=row["op"], shape=row["shape"], ours_ms=med["ours"], auto_ms=med.get("auto"),
                pytorch_ms={n: med[n] for n in row["pytorch"]},
                context_ms={n: med[n] for n in row.get("context", {})}, best=best, ratio=med[best] / med["ours"])


def rows(quick: bool, gen: torch.Generator):
    if quick:
        yield inner_attention_row(32, 4, 16, 6, gen)
        yield nested_attention_row(32, 4, 16, 6, "realformer", gen)
        yield nested_attention_row(2, 6, 40, 16, "coda", gen)
        yield hsim_row(64, 96, 12, gen)
        return
    yield inner_attention_row(1568, 4, 16, 6, gen)
    for form in ("realformer", "coda"):
        yield nested_attention_row(1568, 4, 16, 6, form, gen)
        yield nested_attention_row(8, 6, 197, 64, form, gen)
    yield hsim_row(2304, 768, 12, gen)
    yield train_row(8, 224, gen)


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo) and logical CPU count, else the platform's word for it."""
    import os
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} logical CPUs)"


def markdown(results: list[dict]) -> str:
    lines = ["| op, shape | ours (\"cpu\") | PyTorch | ratio | backend=None |",
             "|---|---:|---|---:|---:|"]
    for r in results:
        others = ", ".join([f"{n} {v:.1f} ms" for n, v in r["pytorch_ms"].items()]
                           + [f"({n} {v:.1f} ms: another op)" for n, v in r["context_ms"].items()])
        auto = "—" if r["auto_ms"] is None else f"{r['auto_ms']:.1f} ms"
        lines.append(f"| {r['op']}, {r['shape']} | {r['ours_ms']:.1f} ms | {others} | {r['ratio']:.2f}× | {auto} |")
    return "\n".join(lines)


COLUMNS = [harness.column("op", "op", width=28, left=True), harness.column("shape", "shape", width=24, left=True),
           harness.column("ours ms", "ours_ms", "{:.2f}", width=9),
           harness.column("None ms", "auto_ms", "{:.2f}", width=9, missing="-"),
           harness.column("best PyTorch", "best", width=12, left=True),
           harness.column("its ms", lambda r: f"{r['pytorch_ms'][r['best']]:.2f}", width=9),
           harness.column("ratio", "ratio", "{:.2f}", width=6)]


def main(argv=None) -> None:
    ap = harness.parser(__doc__, dtype=False, repeat_flags=("--rounds",),
                        repeat_help="interleaved rounds per row (default 15; 3 with --quick)")
    ap.set_defaults(device="cpu")
    args = harness.parse(ap, argv, __file__)
    if args.gpu:
        ap.error("bench_cpu.py times the C++ CPU ops: --device cpu")
    rounds = args.repeat or (3 if args.quick else 15)
    gen = torch.Generator().manual_seed(0)
    meta = harness.environment(torch.device("cpu"), rounds=rounds, cpu_model=_cpu_model())
    with harness.Results(args.out, meta, COLUMNS, echo=True) as results:
        for row in rows(args.quick, gen):
            if results.over_budget():
                print(f"{row['op']}, {row['shape']}: {results.over_budget()}")
                continue
            training = row["op"].startswith("TNT-S")
            warmup = args.warmup if args.warmup is not None else (1 if args.quick or training else 2)
            results.add(measure(row, max(3, rounds // 3) if training else rounds, warmup))
    print(f"\nCPU: {meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}")
    print(markdown(results.rows))


if __name__ == "__main__":
    main()

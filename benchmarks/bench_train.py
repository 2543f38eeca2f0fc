"""End to end: one full training step (forward, loss, backward, AdamW step) of TNT-family models.

What PyTorch users run today against tntkernels (docs/baselines.md §2, "End to end"):
  tnt_s    TNT-S (timm tnt_s_patch16_224, 224², batch 64 and 128 on GPU):
           timm_eager                      timm.create_model("tnt_s_patch16_224")
           timm_compile                    torch.compile of it
           timm+swap_in(<kernel>)          tntkernels.swap_in(model, backend=<kernel>)  (triton, cuda on GPU)
           timm+swap_in                    tntkernels.swap_in(model)  (the default backend)
           compile(timm+swap_in(triton))   torch.compile of the swapped model
           ours_tnt_s(triton)              tntkernels.models.create_model("tnt_s_patch16_224", backend="triton")
  vit_s16  timm vit_small_patch16_224 (same outer width: the ceiling; the inner level can at best cost nothing)
  nested_tnt_s  tntkernels.models.create_model("nested_tnt_s_patch16_224") (default backend and triton)
  rtnt_ti  rtnt_ti_patch8_32 at 32² (batch 128 and 256 on GPU; default backend and triton)
bf16 autocast (GPU), fused AdamW, synthetic N(0, 1) images and random labels resident on the device.
Each (candidate, batch): warm-up steps (the first one compiles, timed as compile_s), then --steps
steps each timed between CUDA synchronizations: median (p20, p80) step time, img/s = batch / median,
peak memory (torch.cuda.max_memory_allocated over the timed steps: weights, optimizer state,
activations). A candidate that fails (no kernel for the device, OOM, compile error) is a row with a
note, not an abort. The JSON is rewritten after every row, so a run cut short keeps what it measured;
--budget SECONDS skips (with a note) the candidates that would start after that many seconds.

    python benchmarks/bench_train.py --out benchmarks/results/train.json      # GPU: the full sweep
    python benchmarks/bench_train.py --device cpu --quick --out /tmp/t.json   # smoke run on CPU (tiny models)
On CPU (--quick) every model is a tiny 32² stand-in (2 blocks) at batch 2: it checks the harness,
its numbers mean nothing. Writes JSON (--out or --out-dir), prints a table, plots a PNG next to the
JSON. Timing, rows, JSON, table, plot and SIGTERM handling: benchmarks/harness.py.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F

import harness  # benchmarks/harness.py; first: it puts the repository root on sys.path
import tntkernels
from tntkernels import _backend
from tntkernels.models import create_model

GROUPS = ("tnt_s", "vit_s16", "nested_tnt_s", "rtnt_ti")
COMPILE_RESERVE_S = 90  # with --budget on GPU, a torch.compile candidate starts only with this much left


def _step_ms(r) -> str:
    if r["step_ms"] is None:
        return "n/a"
    return f"{r['step_ms']:.2f} ({r['step_ms_p20']:.2f}-{r['step_ms_p80']:.2f})"


COLUMNS = [harness.column("group", "group", width=13, left=True), harness.column("B", "batch", width=4),
           harness.column("impl", "impl", width=30, left=True),
           harness.column("img/s", "img_per_s", "{:.1f}", width=9, missing="n/a"),
           harness.column("step ms (p20-p80)", _step_ms, width=24), harness.column("peak MiB", "peak_mib", "{:.0f}", width=9),
           harness.column("compile s", "compile_s", "{:.0f}", width=9), harness.NOTE]


def _case(r):
    return (r["group"] if r["group"] != "vit_s16" else "tnt_s", r["batch"])


PLOT = dict(value="img_per_s", keep=lambda r: True, case=_case, case_order=lambda c: (GROUPS.index(c[0]), c[1]),
            title=lambda c: (f"{c[0]} (+ViT-S/16 ceiling) B={c[1]}: training img/s (higher is better)" if c[0] == "tnt_s"
                             else f"{c[0]} B={c[1]}: training img/s (higher is better)"),
            color=lambda r: "tab:green" if r["ours"] else "tab:blue" if r["group"] == "vit_s16" else "tab:gray",
            label=lambda r: f"{r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else None)


class Candidate:
    """One row source: impl name, model name, group, a builder returning the (uncompiled) model, input
    geometry, and whether to torch.compile it."""

    def __init__(self, impl, model, group, build, img_size, in_chans, num_classes, compile_=False, ours=False):
        self.impl, self.model, self.group, self.build = impl, model, group, build
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.compile, self.ours = compile_, ours


def _timm():
    import timm
    import timm.models.tnt  # noqa: F401  (swap_in matches timm's classes by isinstance once imported)
    return timm


def _timm_tnt(tiny: bool):
    timm = _timm()
    if tiny:  # the tnt_t_patch8_32 geometry (16 sentences of 4×4 words, inner head_dim 6), 2 blocks
        return timm.models.tnt.TNT(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=96, inner_dim=12,
                                   depth=2, num_heads_inner=2, num_heads_outer=3, first_stride=2)
    return timm.create_model("tnt_s_patch16_224")


def _swapped(tiny: bool, backend: str | None):
    model, _ = tntkernels.swap_in(_timm_tnt(tiny), backend=backend)
    return model


def candidates(device: torch.device, quick: bool) -> list[Candidate]:
    """Every candidate, cheapest and most informative first (compiled ones last: they cost minutes)."""
    tiny = device.type != "cuda" and quick
    kernels = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    k0 = kernels[0]
    tnt = "tnt_t_patch8_32(timm TNT, depth 2)" if tiny else "tnt_s_patch16_224"
    size, classes = (32, 10) if tiny else (224, 1000)
    c = [Candidate("timm_eager", tnt, "tnt_s", lambda: _timm_tnt(tiny), size, 3, classes)]
    for k in kernels:
        c.append(Candidate(f"timm+swap_in({k})", tnt, "tnt_s", lambda k=k: _swapped(tiny, k), size, 3, classes, ours=True))
    c.append(Candidate("timm+swap_in", tnt, "tnt_s", lambda: _swapped(tiny, None), size, 3, classes, ours=True))
    if tiny:
        c.append(Candidate(f"ours_tnt_t({k0})", "tnt_t_patch8_32(depth 2)", "tnt_s",
                           lambda: create_model("tnt_t_patch8_32", depth=2, backend=k0), 32, 1, 10, ours=True))
        c.append(Candidate("vit_s16", "vit(32², patch 8, 96 wide, depth 2)", "vit_s16",
                           lambda: _timm().models.vision_transformer.VisionTransformer(
                               img_size=32, patch_size=8, num_classes=10, embed_dim=96, depth=2, num_heads=3),
                           32, 3, 10))
        nested, nested_kw, nsize, nchans, ncls = "nested_tnt_t_patch8_32", dict(depth=2), 32, 1, 10
        rtnt, rtnt_kw = "rtnt_n_patch8_32", dict(depth=2)
    else:
        c.append(Candidate(f"ours_tnt_s({k0})", "tnt_s_patch16_224", "tnt_s",
                           lambda: create_model("tnt_s_patch16_224", backend=k0), 224, 3, 1000, ours=True))
        c.append(Candidate("vit_s16", "vit_small_patch16_224", "vit_s16",
                           lambda: _timm().create_model("vit_small_patch16_224"), 224, 3, 1000))
        nested, nested_kw, nsize, nchans, ncls = "nested_tnt_s_patch16_224", {}, 224, 3, 1000
        rtnt, rtnt_kw = "rtnt_ti_patch8_32", {}
    c.append(Candidate("nested_tnt_s", nested, "nested_tnt_s", lambda: create_model(nested, **nested_kw),
                       nsize, nchans, ncls, ours=True))
    c.append(Candidate(f"nested_tnt_s({k0})", nested, "nested_tnt_s",
                       lambda: create_model(nested, backend=k0, **nested_kw), nsize, nchans, ncls, ours=True))
    c.append(Candidate("rtnt_ti", rtnt, "rtnt_ti", lambda: create_model(rtnt, **rtnt_kw), 32, 1, 10, ours=True))
    c.append(Candidate(f"rtnt_ti({k0})", rtnt, "rtnt_ti", lambda: create_model(rtnt, backend=k0, **rtnt_kw),
                       32, 1, 10, ours=True))
    c.append(Candidate("timm_compile", tnt, "tnt_s", lambda: _timm_tnt(tiny), size, 3, classes, compile_=True))
    c.append(Candidate(f"compile(timm+swap_in({k0}))", tnt, "tnt_s", lambda: _swapped(tiny, k0), size, 3, classes,
                       compile_=True, ours=True))
    # ours first, then the eager baselines, the torch.compile candidates (minutes of compiling) last: a run
    # cut short by --budget or its time limit keeps what matters most (the JSON is rewritten per row)
    return sorted(c, key=lambda cand: (cand.compile, not cand.ours))


def measure(cand: Candidate, batch: int, device: torch.device, amp: torch.dtype | None, warmup: int, steps: int,
            model=None):
    """Time `steps` training steps after `warmup` (the first one timed alone: compile_s); returns (row
    fields, model) (the model is reused for the next batch size of the same candidate)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cand.in_chans, cand.img_size, cand.img_size, generator=gen).to(device)
    y = torch.randint(0, cand.num_classes, (batch,), generator=gen).to(device)
    if model is None:
        torch.manual_seed(0)
        model = cand.build().to(device).train()
        if cand.compile:
            model = torch.compile(model, dynamic=False)  # one static graph per batch size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first_s, loss = harness.wall_s(step, device)
    if not torch.isfinite(loss.detach()).item():
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    for _ in range(max(0, warmup - 1)):
        step()
    harness.reset_peak(device)  # the peak over the timed steps: weights, optimizer state, activations
    med, p20, p80 = harness.timed(step, device, warmup=0, repeat=steps, flush_cache=False)
    peak = harness.max_allocated_mib(device)
    del opt
    return dict(harness.metrics(med, p20, p80, peak), img_per_s=batch / (med * 1e-3), step_ms=med, step_ms_p20=p20,
                step_ms_p80=p80, first_step_s=first_s, compile_s=first_s if cand.compile else None, steps=steps), model


def _selected(cand: Candidate, impls, groups, explicit_compile: bool) -> bool:
    if groups and cand.group not in groups:
        return False
    if impls:
        return any(fnmatch.fnmatchcase(cand.impl, p) for p in impls)
    return not cand.compile or explicit_compile


def parse_args(argv=None):
    """The command line: harness.parser()'s common arguments and this benchmark's own."""
    ap = harness.parser(__doc__, dtype=False, repeat_flags=("--steps", "--repeat"),
                        quick_help="fewer steps; on CPU tiny 32² stand-ins at batch 2, no torch.compile",
                        repeat_help="timed steps (default 20 on GPU, 10 with --quick, 2 on CPU with --quick)",
                        warmup_help="warm-up steps, the first compiles (default 5 on GPU, 3 with --quick, "
                                    "1 on CPU with --quick)")
    ap.add_argument("--batch", type=int, nargs="+", help="images per batch of the 224² models (default 64 128 on GPU, 2 on CPU)")
    ap.add_argument("--rtnt-batch", type=int, nargs="+", help="images per batch of RTNT at 32² (default 128 256 on GPU, 2 on CPU)")
    ap.add_argument("--models", nargs="+", choices=GROUPS, help="model groups (default: all)")
    ap.add_argument("--impls", nargs="+", help="candidate names or fnmatch patterns, e.g. 'timm*' (default: all; "
                    "on CPU with --quick the compiled ones only when named)")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--amp", choices=("bfloat16", "float16", "none"), help="autocast dtype (default bfloat16 on GPU, none on CPU)")
    return harness.parse(ap, argv, __file__)


def main(argv=None):
    args = parse_args(argv)
    device, gpu = args.device, args.gpu
    tiny = not gpu and args.quick
    all_cands = candidates(device, args.quick)
    if args.list:
        for c in all_cands:
            print(f"{c.group:13s} {c.impl:34s} {c.model}{'  (torch.compile)' if c.compile else ''}")
        return []
    batches = args.batch or ([64, 128] if gpu else [2])
    rtnt_batches = args.rtnt_batch or ([128, 256] if gpu else [2])
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}[args.amp or ("bfloat16" if gpu else "none")]
    steps = args.repeat or (20 if gpu and not args.quick else 10 if gpu or not args.quick else 2)
    warmup = args.warmup or (5 if gpu and not args.quick else 3 if gpu or not args.quick else 1)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = harness.environment(device, benchmark="train_step", amp=str(amp).replace("torch.", "") if amp else None,
                               optimizer="AdamW(fused)" if gpu else "AdamW", warmup=warmup, steps=steps,
                               tiny_cpu_stand_ins=tiny,
                               backends_available={b: _backend.why_unavailable(b, device) is None
                                                   for b in ("cpu", "cuda", "triton")})
    results = harness.Results(args.out, meta, COLUMNS, echo=True, budget=args.budget,
                              plot_spec=dict(PLOT, subtitle=f"amp {meta['amp']}"))
    with results:
        for cand in all_cands:
            if not _selected(cand, args.impls, args.models, explicit_compile=not tiny):
                continue
            model = None
            for B in (rtnt_batches if cand.group == "rtnt_ti" else batches):
                case = dict(model=cand.model, group=cand.group, ours=cand.ours, batch=B, img_size=cand.img_size)
                row = harness.row(case, cand.impl, "train_step", harness.metrics(), img_per_s=None, step_ms=None,
                                  step_ms_p20=None, step_ms_p80=None, first_step_s=None, compile_s=None, steps=0)
                skip = results.over_budget(reserve=COMPILE_RESERVE_S if cand.compile and gpu else 0)
                if skip:
                    row["note"] = skip
                else:
                    results.expect(row)
                    try:
                        if cand.compile:
                            torch._dynamo.reset()
                            model = None  # a fresh static graph per batch size
                        fields, model = measure(cand, B, device, amp, warmup, steps, model)
                        row.update(fields)
                    except Exception as exc:  # noqa: BLE001  a candidate that fails is a row with a note
                        row["note"] = harness.error_note(exc)
                        model = None
                    if gpu:
                        torch.cuda.empty_cache()
                results.add(row)
            del model
            if gpu:
                torch.cuda.empty_cache()
    return results.rows


if __name__ == "__main__":
    main()

"""The benchmarks' shared harness: timing, memory, rooflines, rows, JSON, table, plot and arguments.

Every benchmark script (bench_*.py) holds only its shapes, its candidates and its own arguments;
it imports this module with a plain `import harness` (a script's own folder is on sys.path when it
runs as `python benchmarks/bench_x.py`; tests put benchmarks/ on sys.path). Importing the harness
puts the repository root first on sys.path, so the scripts measure this checkout's tntkernels.

    timed(fn, device, quick)            (median, p20, p80) ms: CUDA events on GPU, wall clock on CPU
    peak_mib(fn, device)                CUDA memory allocated by one fn() above what was there before
    reset_peak / max_allocated_mib      the same over a stretch of code (absolute, e.g. a training step)
    wall_s(fn, device)                  seconds of one synchronized call, and its result (first = compile)
    copy_bandwidth(device)              measured device-to-device copy bytes/s (memory roofline's slope)
    gemm_rate(device, dtype)            measured dense matmul FLOP/s (compute roofline's roof)
    floor_pct(ms, work, rate)           % of a roofline: (work / rate) over the measured time
    metrics / failed / error_note       a row's measured fields; the same with a failure's note
    row(case, impl, pass_, metrics)     THE row format (one dict per candidate x case x pass)
    run_case(fn, inputs, grads, ...)    a candidate's fwd / bwd / fwd+bwd metrics; never raises
    measure_candidates(results, ...)    run_case for every candidate of a case, one row per pass
    Results                             rows + meta, JSON rewritten after every row, SIGTERM-safe
    column / format_row / print_table   the text table
    plot(rows, path, meta, ...)         a horizontal bar chart per case (matplotlib, imported lazily)
    parser(doc, ...) / parse(ap, argv)  the common arguments (--device --dtype --shapes --quick/--smoke
                                        --out --out-dir --repeat --warmup --threads --budget), defaults
    implemented_backends(call)          the backends an op has, asked of the op itself
    environment(device)                 GPU / CPU name, driver, torch, CUDA, triton, git commit, ...
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)
import tntkernels  # noqa: E402
from tntkernels import _backend  # noqa: E402

PASSES = ("fwd", "bwd", "fwd+bwd")
BACKENDS = ("reference", "cpu", "cuda", "triton")
DTYPES = ("float32", "bfloat16", "float16")
NOTE_CHARS = 200


# ------------------------------------------------------------------ environment

def _run(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, **extra) -> dict:
    """What produced the numbers: torch, CUDA, triton, tntkernels, git commit, Python, threads, and the
    GPU name and driver (CUDA) or the CPU (else); `extra` is merged in."""
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, tntkernels=tntkernels.__version__,
               commit=_run("git", "rev-parse", "--short", "HEAD") or "unknown",
               python=platform.python_version(), threads=torch.get_num_threads())
    if _backend.triton_importable():
        import triton
        env["triton"] = triton.__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["driver"] = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    else:
        env["cpu"] = platform.processor() or platform.machine()
    env.update(extra)
    return env


# ------------------------------------------------------------------ timing and memory

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def timed(fn: Callable[[], object], device: torch.device, quick: bool = False, *, warmup: int | None = None,
          repeat: int | None = None, flush_cache: bool = True) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() after warm-up.

    CUDA: each call between two CUDA events, the L2 cache flushed before each (outside the events);
    by default warm-up calls for 25 ms (quick) / 100 ms and timed calls for 50 / 300 ms (at least 5),
    as triton.testing.do_bench. Elsewhere: wall clock per call; by default 2 warm-up calls and calls
    for 0.3 s (quick) / 2 s (at least 3). warmup / repeat: exact numbers of calls instead."""
    if device.type == "cuda":
        _sync(device)
        cache = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device) if flush_cache else None
        if warmup is None or repeat is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            _sync(device)
            est = max(start.elapsed_time(end) / 5, 1e-3)
            warmup = warmup if warmup is not None else max(1, int((25 if quick else 100) / est))
            repeat = repeat if repeat is not None else max(5, int((50 if quick else 300) / est))
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            if cache is not None:
                cache.zero_()
            start.record()
            fn()
            end.record()
        _sync(device)
        del cache
        return _quantiles([start.elapsed_time(end) for start, end in events])
    for _ in range(2 if warmup is None else warmup):
        fn()
    times: list[float] = []
    budget = 0.3 if quick else 2.0
    start_s = time.perf_counter()
    while (len(times) < repeat) if repeat is not None else (time.perf_counter() - start_s < budget or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def wall_s(fn: Callable[[], object], device: torch.device):
    """(seconds, result) of one fn() between device synchronizations (a first call: its compile time)."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def max_allocated_mib(device: torch.device, base: int = 0) -> float | None:
    """CUDA memory allocated at its peak since reset_peak, less `base` bytes, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB that one fn() allocates at its peak above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    reset_peak(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    return max_allocated_mib(device, base)


# ------------------------------------------------------------------ rooflines

def copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write): the memory roofline's slope."""
    if device.type != "cuda":
        return None
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device, flush_cache=False)[0]
    return 2 * x.numel() / (ms * 1e-3)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float | None:
    """Measured dense GEMM rate in FLOP/s (an n³ torch.matmul at the current float32 matmul
    precision): the compute roofline's roof."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(lambda: a @ b, device, flush_cache=False)[0]
    return 2 * n ** 3 / (ms * 1e-3)


def floor_pct(ms: float | None, work: float | None, rate: float | None) -> float | None:
    """% of a roofline: the floor work / rate (bytes over bytes/s, FLOPs over FLOP/s) over the
    measured ms; None when anything is missing."""
    if not ms or not work or not rate:
        return None
    return 100 * (work / rate) / (ms * 1e-3)


# ------------------------------------------------------------------ rows

def error_note(exc: BaseException) -> str:
    """'Type: first line of the message' (cut to NOTE_CHARS), a failed row's note."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:NOTE_CHARS] if lines else ''}"


def metrics(median_ms=None, p20_ms=None, p80_ms=None, peak_mib=None, note: str = "") -> dict:
    """The measured fields every row has."""
    return dict(median_ms=median_ms, p20_ms=p20_ms, p80_ms=p80_ms, peak_mib=peak_mib, note=note)


def failed(why: BaseException | str) -> dict:
    """metrics() of a candidate that did not run: no numbers, the exception (or a sentence) as note."""
    return metrics(note=why if isinstance(why, str) else error_note(why))


def row(case: dict, impl: str, pass_: str, measured: dict, **extra) -> dict:
    """The one row format: the case's fields (what, shape, batch, dtype, ...), impl (a name starting
    with "ours" for tntkernels' own), pass_ ("fwd", "bwd", "fwd+bwd", "train_step"), metrics(), then
    the benchmark's own fields."""
    return {**case, "impl": impl, "pass_": pass_, **measured, **extra}


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _as_tuple(obj) -> tuple:
    return tuple(obj) if isinstance(obj, (tuple, list)) else (obj,)


def run_case(fn: Callable, inputs: Sequence, grads, device: torch.device, quick: bool = False, *,
             passes: Sequence[str] = PASSES, leaves: Sequence[torch.Tensor] | None = None,
             warmup: int | None = None, repeat: int | None = None):
    """Measure fn(*inputs) in each of `passes`; returns ({pass: metrics()}, outputs).

      fwd      fn(*inputs) under torch.no_grad();
      bwd      backward of one forward's outputs (retain_graph), upstream gradients `grads`;
      fwd+bwd  fn(*inputs), then its backward.
    fn returns a tensor or a tuple / list of tensors; grads is a tensor or a sequence with one
    gradient per output (None: ones). Before every backward the .grad of `leaves` is set to None, as
    a training step does (default leaves: every tensor in inputs, nested sequences too, that
    requires grad, and the parameters of fn when it is an nn.Module). outputs: fn's outputs
    detached (same structure), None when the forward raised. A candidate that raises gives metrics
    with its error note (every pass when the forward itself raises), never an exception."""
    if leaves is None:
        leaves = [t for t in _tensors(inputs) if t.requires_grad]
        if isinstance(fn, torch.nn.Module):
            leaves += [p for p in fn.parameters() if p.requires_grad]
    backward = any(p != "fwd" for p in passes)

    def clear():
        for t in leaves:
            t.grad = None

    def grads_for(outs):
        outs = _as_tuple(outs)
        gs = _as_tuple(grads) if grads is not None else (None,) * len(outs)
        return outs, tuple(torch.ones_like(o) if g is None else g for o, g in zip(outs, gs))

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        clear()
        torch.autograd.backward(*grads_for(fn(*inputs)))

    try:
        with torch.set_grad_enabled(backward):
            outs = fn(*inputs)
    except Exception as exc:  # noqa: BLE001  a candidate that rejects the shape is reported, not fatal
        return {p: failed(exc) for p in passes}, None
    out_t, grad_t = grads_for(outs)

    def bwd():
        clear()
        torch.autograd.backward(out_t, grad_t, retain_graph=True)

    results = {}
    for pas in passes:
        f = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}[pas]
        try:
            med, p20, p80 = timed(f, device, quick, warmup=warmup, repeat=repeat)
            results[pas] = metrics(med, p20, p80, peak_mib(f, device))
        except Exception as exc:  # noqa: BLE001
            results[pas] = failed(exc)
        clear()
    detached = tuple(o.detach() for o in out_t)
    return results, (detached if isinstance(outs, (tuple, list)) else detached[0])


def measure_candidates(results: "Results", case: dict, candidates: Iterable[tuple], inputs: Sequence, grads,
                       args: argparse.Namespace, *, extra: Callable[..., dict] | None = None,
                       passes: Sequence[str] = PASSES) -> None:
    """run_case for each candidate of one case, adding one row() per pass to `results`.

    candidates: (impl, fn) pairs, or (impl, fn, inputs) to give that candidate its own inputs.
    extra(impl, pass_, metrics, outputs) -> the row's benchmark-specific fields (e.g. rooflines).
    A candidate that would start after --budget gets rows with a "skipped" note."""
    for cand in candidates:
        impl, fn, cand_inputs = (*cand, inputs) if len(cand) == 2 else cand
        skip = results.over_budget()
        if skip:
            measured, outs = {p: failed(skip) for p in passes}, None
        else:
            results.expect(row(case, impl, passes[0], failed("")))
            measured, outs = run_case(fn, cand_inputs, grads, args.device, args.quick, passes=passes,
                                      warmup=args.warmup, repeat=args.repeat)
        for pas, m in measured.items():
            results.add(row(case, impl, pas, m, **(extra(impl, pas, m, outs) if extra else {})))
        del outs


# ------------------------------------------------------------------ table

class Column:
    """One column of the text table: header, width, and what to print: a row key formatted with
    `fmt` (missing value: `missing`), or a function of the row."""

    def __init__(self, header: str, get: str | Callable[[dict], str], fmt: str = "{}", width: int = 8,
                 left: bool = False, missing: str = "-"):
        self.header, self.get, self.fmt, self.width, self.left, self.missing = header, get, fmt, width, left, missing

    def cell(self, r: dict) -> str:
        if callable(self.get):
            text = self.get(r)
        else:
            v = r.get(self.get)
            text = self.missing if v is None else self.fmt.format(v)
        return self.pad(text)

    def pad(self, text: str) -> str:
        return f"{text:<{self.width}s}" if self.left else f"{text:>{self.width}s}"


column = Column
NOTE = Column("note", "note", left=True, width=0)


def format_row(r: dict, columns: Sequence[Column]) -> str:
    return " ".join(c.cell(r) for c in columns).rstrip()


def print_table(rows: Sequence[dict], columns: Sequence[Column]) -> None:
    print(" ".join(c.pad(c.header) for c in columns).rstrip())
    for r in rows:
        print(format_row(r, columns))


# ------------------------------------------------------------------ plot

def kernel_case(r: dict) -> tuple:
    return (r.get("what"), r.get("shape"), r.get("batch"), r.get("dtype"))


def plot(rows: Sequence[dict], path: str, meta: dict, *, value: str = "median_ms",
         keep: Callable[[dict], bool] = lambda r: r.get("pass_") == "fwd+bwd",
         case: Callable[[dict], tuple] = kernel_case, case_order: Callable[[tuple], object] | None = None,
         title: Callable[[tuple], str] = lambda c: f"{c[0]} {c[1]} B={c[2]} {c[3]} fwd+bwd (ms, lower is better)",
         color: Callable[[dict], str] = lambda r: "tab:green" if str(r["impl"]).startswith("ours") else "tab:gray",
         label: Callable[[dict], str | None] | None = None, subtitle: str = "") -> str | None:
    """A PNG at `path`: per case (rows grouped by case(row), those where keep(row)) one horizontal bar
    per impl of row[value]; label(row) is written beside its bar. matplotlib is imported here; without
    it (or with no measured row) nothing is drawn. Returns the path written or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    sel = [r for r in rows if keep(r) and r.get(value)]
    cases = sorted({case(r) for r in sel}, key=case_order or (lambda c: tuple(str(x) for x in c)))
    if not cases:
        print("no measured rows: no plot")
        return None
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, 0.3 * len(sel) + 1.0 * len(cases) + 0.5), squeeze=False)
    for ax, c in zip(axes[:, 0], cases):
        bars = [r for r in sel if case(r) == c]
        ax.barh([r["impl"] for r in bars], [r[value] for r in bars], color=[color(r) for r in bars])
        for i, r in enumerate(bars):
            text = label(r) if label else None
            if text:
                ax.text(r[value], i, f" {text}", va="center", fontsize=7)
        ax.set_title(title(c), fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(" · ".join(s for s in (meta.get("gpu") or meta.get("cpu"), f"torch {meta.get('torch')}", subtitle,
                                         f"commit {meta.get('commit')}") if s), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------ results

class Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, keep and plot what was measured."""


class Results:
    """A run's meta and rows. The JSON {meta, complete, rows} at `out` is rewritten (atomically) after
    every row, so a run cut short keeps what it measured. As a context manager: inside, SIGTERM
    raises Terminated; on leaving, a Terminated run gets a row for the candidate it was measuring
    (see expect) with a "stopped by" note, the table is printed, the JSON written with `complete`
    (False when stopped or failed) and, with `plot_spec` (keyword arguments of plot()), a PNG drawn
    next to the JSON. echo: print each row as it is added."""

    def __init__(self, out: str | None, meta: dict, columns: Sequence[Column], *, plot_spec: dict | None = None,
                 echo: bool = False, budget: float | None = None):
        self.out, self.meta, self.columns, self.plot_spec = out, meta, list(columns), plot_spec
        self.echo, self.budget = echo, budget
        self.rows: list[dict] = []
        self.complete = True
        self.start = time.perf_counter()
        self._pending: dict | None = None
        self._old_term = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, reserve: float = 0.0) -> str | None:
        """The note of a candidate skipped because --budget is spent (keeping `reserve` s), else None."""
        if self.budget is not None and self.elapsed() + reserve > self.budget:
            return f"skipped: budget of {self.budget:.0f} s spent"
        return None

    def expect(self, template: dict | None) -> None:
        """The row being measured now (recorded with a note if SIGTERM stops the run before add)."""
        self._pending = template

    def add(self, r: dict) -> dict:
        self.rows.append(r)
        self._pending = None
        if self.echo:
            print(format_row(r, self.columns), flush=True)
        self.save()
        return r

    def save(self) -> None:
        if not self.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=self.meta, complete=self.complete, rows=self.rows), f, indent=1)
        os.replace(tmp, self.out)

    def __enter__(self) -> "Results":
        def on_term(signum, frame):
            raise Terminated(f"signal {signum}")

        try:
            self._old_term = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            self._old_term = None
        print(json.dumps(self.meta), flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        if exc_type is not None:
            self.complete = False
        if exc_type is Terminated:
            if self._pending is not None:
                self.rows.append({**self._pending, "note": f"stopped by {exc} after {self.elapsed():.0f} s; "
                                                           "later candidates not run"})
            print(f"stopped by {exc}: writing what was measured", flush=True)
        print_table(self.rows, self.columns)
        self.save()
        if self.out:
            print(f"wrote {self.out} ({self.elapsed():.0f} s)")
            if self.plot_spec is not None:
                try:
                    plot(self.rows, os.path.splitext(self.out)[0] + ".png", self.meta, **self.plot_spec)
                except Exception as plot_exc:  # noqa: BLE001  a plot never costs the numbers
                    print(f"no plot: {error_note(plot_exc)}")
        return exc_type is Terminated


# ------------------------------------------------------------------ arguments

def parser(doc: str, *, dtype: bool = True, shapes: dict | None = None, shapes_default: list | None = None,
           shapes_help: str | None = None, quick_help: str = "short timings, no torch.compile on CPU (smoke runs)",
           repeat_flags: Sequence[str] = ("--repeat",),
           repeat_help: str = "timed calls per measurement (default: by time, 50 / 300 ms on GPU, 0.3 / 2 s on CPU)",
           warmup_help: str = "warm-up calls before timing (default: by time on GPU, 2 on CPU)") -> argparse.ArgumentParser:
    """An ArgumentParser with the arguments every benchmark has (the script adds its own):
    --device, --dtype (unless dtype=False), --shapes (with `shapes`, the script's name -> shape dict;
    default shapes_default, else all), --quick/--smoke, --out FILE / --out-dir DIR, --repeat (or
    repeat_flags), --warmup, --threads, --budget."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if dtype:
        ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=None,
                        help="default: float32 bfloat16 on GPU, float32 on CPU")
    if shapes is not None:
        ap.add_argument("--shapes", nargs="+", choices=tuple(shapes),
                        default=list(shapes) if shapes_default is None else shapes_default, help=shapes_help)
    ap.add_argument("--quick", "--smoke", dest="quick", action="store_true", help=quick_help)
    ap.add_argument("--out", help="JSON file to write, rewritten after every row (a PNG plot is written next to it)")
    ap.add_argument("--out-dir", help="folder to write <script name>.json (and .png) in, instead of --out")
    ap.add_argument(*repeat_flags, dest="repeat", type=int, help=repeat_help)
    ap.add_argument("--warmup", type=int, help=warmup_help)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: 1 with --quick, which keeps "
                                                 "a smoke run fast on a busy machine; else torch's choice)")
    ap.add_argument("--budget", type=float, help="seconds: candidates that would start later are skipped with a note")
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None, script: str) -> argparse.Namespace:
    """ap.parse_args(argv), then: args.device a torch.device, args.gpu, args.dtypes (the --dtype list
    or the device's default), args.out (from --out-dir: <dir>/<script name>.json), CPU threads set."""
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    args.gpu = args.device.type == "cuda"
    if "dtype" in vars(args):
        args.dtypes = args.dtype or (["float32", "bfloat16"] if args.gpu else ["float32"])
    if args.out is None and args.out_dir:
        args.out = os.path.join(args.out_dir, os.path.splitext(os.path.basename(script))[0] + ".json")
    if not args.gpu and (args.threads or args.quick):
        torch.set_num_threads(args.threads or 1)
    return args


# ------------------------------------------------------------------ tntkernels

def implemented_backends(call: Callable[[str], object], names: Sequence[str] = BACKENDS) -> list[str]:
    """The backends an op has, asked of the op: call(name) runs it with backend=name on tiny inputs on
    the meta device (so no kernel runs). A backend the op rejects as "not implemented" is left out;
    any other outcome (it ran, or is merely unavailable here) keeps it."""
    have = []
    for name in names:
        try:
            call(name)
        except Exception as exc:  # noqa: BLE001
            if "not implemented" in str(exc):
                continue
        have.append(name)
    return have


def runnable(name: str, implemented: Sequence[str], device: torch.device) -> bool:
    """The op has backend `name` and it can run on `device`."""
    return name in implemented and _backend.why_unavailable(name, device) is None

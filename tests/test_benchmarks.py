"""Smoke runs of the benchmark scripts on CPU (they run end to end and write what they promise), the
shared harness (benchmarks/harness.py) on its own, and the command lines scripts/gpu_suite.sh uses."""
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from tntkernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
import harness  # noqa: E402  (benchmarks/harness.py)

pytestmark = pytest.mark.integration  # subprocesses; CI: the GPU machine's stack (.ci/run)

SCRIPTS = ("bench_inner_attention", "bench_nested_attention", "bench_hsim_split", "bench_train")


def load(name):
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _keep_threads():
    """--quick on CPU sets torch's thread count: give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_inner_attention_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "cpu.json"
    load("bench_inner_attention").main(["--device", "cpu", "--quick", "--batch", "1", "--shapes", "tnt_s",
                                        "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["commit"] is not None and data["complete"] is True
    impls = {(r["what"], r["impl"]) for r in data["rows"]}
    assert {("attention", "timm_eager"), ("attention", "sdpa"), ("inner_block", "timm_eager")} <= impls
    if _backend.cpp_available():
        assert ("attention", "ours_cpu") in impls and ("inner_block", "ours_cpu") in impls
    assert all(r["median_ms"] > 0 for r in data["rows"] if r["impl"] in ("timm_eager", "ours_cpu"))
    assert {r["pass_"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    for r in data["rows"]:  # the keys write_readme_perf.kernel_table reads
        assert {"what", "shape", "batch", "dtype", "impl", "pass_", "median_ms", "peak_mib", "roofline_pct"} <= set(r)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "cpu.png").stat().st_size > 0


@pytest.mark.cpp
def test_bench_cpu_smoke(tmp_path, capsys):
    """The CPU side-by-side table: one row per op, ours against every PyTorch candidate, ratios
    consistent with the medians, backend=None timed, and the Markdown table printed."""
    if not _backend.cpp_available():
        pytest.skip("needs tntkernels._C (the C++ CPU ops)")
    out = tmp_path / "cpu_table.json"
    load("bench_cpu").main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["cpu_model"] and data["meta"]["threads"] == 1 and data["complete"] is True
    ops = [r["op"] for r in data["rows"]]
    assert ops == ["inner_attention", "nested_attention realformer", "nested_attention coda", "hsim_split_linear"]
    for r in data["rows"]:
        assert r["ours_ms"] > 0 and all(v > 0 for v in r["pytorch_ms"].values())
        assert abs(r["ratio"] - r["pytorch_ms"][r["best"]] / r["ours_ms"]) < 1e-9
        assert r["pytorch_ms"][r["best"]] == min(r["pytorch_ms"].values())
        assert r["auto_ms"] > 0  # backend=None timed too
    assert "dense nn.Linear" in data["rows"][-1]["context_ms"]  # timed, not in the ratio
    printed = capsys.readouterr().out
    assert "| inner_attention, S 32, H 4, m 16, d 6 |" in printed and "| backend=None |" in printed


def test_bench_nested_attention_smoke(tmp_path):
    out = tmp_path / "nested.json"
    load("bench_nested_attention").main(["--device", "cpu", "--quick", "--batch", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["complete"] is True
    impls = {(r["what"], r["shape"], r["impl"]) for r in data["rows"]}
    for shape in ("inner", "outer"):
        assert ("nested_coda", shape, "eager(reference)") in impls
        assert ("nested_realformer", shape, "sdpa+logits") in impls
        if _backend.cpp_available() and "cpu" in data["meta"]["backends_implemented"]:
            assert ("nested_coda", shape, "ours_cpu") in impls
    assert all(r["median_ms"] > 0 for r in data["rows"] if r["impl"] in ("eager(reference)", "sdpa+logits"))
    assert {r["pass_"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    assert all("dtype" in r and "batch" in r for r in data["rows"])
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "nested.png").stat().st_size > 0


def test_bench_hsim_split_smoke(tmp_path):
    out = tmp_path / "hsim.json"
    load("bench_hsim_split").main(["--device", "cpu", "--quick", "--threads", "1", "--rows", "32",
                                   "--shapes", "d768", "--dtype", "float32", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["commit"] is not None and data["complete"] is True
    impls = {r["impl"] for r in data["rows"]}
    assert {"tint_reference_form", "bmm", "dense_gemm", "ours_reference"} <= impls
    if _backend.cpp_available() and "cpu" in data["meta"]["backends_implemented"]:
        assert "ours_cpu" in impls
    for r in data["rows"]:
        assert r["median_ms"] is not None and r["median_ms"] > 0, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["max_abs_err"] < 1e-3, r  # every candidate computes the same map
        assert r["dtype"] == "float32" and r["N"] == r["batch"] == 32, r
        assert r["executed_flops"] >= r["flops"], r
    assert {r["pass_"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "hsim.png").stat().st_size > 0


def test_bench_train_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "train.json"
    rows = load("bench_train").main(["--device", "cpu", "--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["commit"] is not None and data["complete"] is True
    assert data["meta"]["benchmark"] == "train_step"  # write_readme_perf tells the training table by it
    assert data["rows"] == json.loads(json.dumps(rows))
    impls = {r["impl"] for r in data["rows"]}
    assert {"timm_eager", "timm+swap_in", "vit_s16", "nested_tnt_s", "rtnt_ti"} <= impls
    if _backend.cpp_available():
        assert "timm+swap_in(cpu)" in impls
    assert {r["group"] for r in data["rows"]} == {"tnt_s", "vit_s16", "nested_tnt_s", "rtnt_ti"}
    for r in data["rows"]:
        assert r["batch"] == 2 and r["steps"] == 2, r
        assert r["note"] == "" and r["img_per_s"] > 0, r  # every candidate runs on CPU
        assert r["step_ms_p20"] <= r["step_ms"] <= r["step_ms_p80"], r
        assert abs(r["img_per_s"] - 2 / (r["step_ms"] * 1e-3)) < 1e-6 * r["img_per_s"]
        assert r["median_ms"] == r["step_ms"] and r["pass_"] == "train_step", r  # the harness's row format
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "train.png").stat().st_size > 0


# ------------------------------------------------------------------ the harness on its own

def test_run_case_tuple_outputs_and_passes():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    fn = lambda x, w: (x @ w, (x * 2).sum(-1))  # noqa: E731
    grads = (torch.ones(8, 4), torch.ones(8))
    measured, out = harness.run_case(fn, (x, w), grads, torch.device("cpu"), quick=True, repeat=3)
    assert set(measured) == set(harness.PASSES)
    for m in measured.values():
        assert m["note"] == "" and m["p20_ms"] <= m["median_ms"] <= m["p80_ms"], m
        assert set(m) == {"median_ms", "p20_ms", "p80_ms", "peak_mib", "note"}
    assert isinstance(out, tuple) and len(out) == 2 and not out[0].requires_grad
    assert torch.allclose(out[0], x.detach() @ w.detach())
    assert x.grad is None and w.grad is None  # cleared after every pass
    only_fwd, single = harness.run_case(lambda x: x.sin(), (x,), None, torch.device("cpu"), passes=("fwd",), repeat=2)
    assert set(only_fwd) == {"fwd"} and isinstance(single, torch.Tensor)


def test_run_case_failures_are_rows():
    x = torch.randn(4, requires_grad=True)

    def rejects(x):
        raise ValueError("shape not supported\nsecond line")

    measured, out = harness.run_case(rejects, (x,), torch.ones(4), torch.device("cpu"), repeat=2)
    assert out is None and set(measured) == set(harness.PASSES)
    for m in measured.values():
        assert m["median_ms"] is None and m["note"] == "ValueError: shape not supported", m

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("no backward here")

    measured, out = harness.run_case(NoBackward.apply, (x,), torch.ones(4), torch.device("cpu"), repeat=2)
    assert measured["fwd"]["median_ms"] > 0 and measured["fwd"]["note"] == ""
    for pas in ("bwd", "fwd+bwd"):
        assert measured[pas]["median_ms"] is None and "no backward here" in measured[pas]["note"]


def test_results_json_after_every_row_and_failed_candidate(tmp_path):
    out = tmp_path / "sub" / "r.json"
    seen = []

    def peek(x):  # the JSON on disk while the second candidate runs: the first one's rows are in it
        seen.append(len(json.loads(out.read_text())["rows"]))
        return x * 3

    def broken(x):
        raise RuntimeError("no kernel for this shape")

    args = harness.parse(harness.parser("t"), ["--device", "cpu", "--quick", "--repeat", "2", "--out", str(out)], "t.py")
    results = harness.Results(args.out, dict(torch="x", commit="c"), [harness.column("impl", "impl"), harness.NOTE])
    with results:
        harness.measure_candidates(results, dict(what="t", shape="s", batch=1, dtype="float32"),
                                   [("ours_a", lambda x: x * 2), ("broken", broken), ("peek", peek)],
                                   (torch.randn(3, requires_grad=True),), torch.ones(3), args,
                                   extra=lambda impl, pas, m, o: dict(got_out=o is not None))
    assert seen and seen[0] >= 6  # ours_a's three rows and broken's three were on disk already
    data = json.loads(out.read_text())
    assert data["complete"] is True and len(data["rows"]) == 9
    bad = [r for r in data["rows"] if r["impl"] == "broken"]
    assert len(bad) == 3 and all(r["median_ms"] is None and "no kernel" in r["note"] and not r["got_out"] for r in bad)
    assert all(r["median_ms"] > 0 and r["got_out"] for r in data["rows"] if r["impl"] != "broken")
    assert {r["pass_"] for r in data["rows"]} == set(harness.PASSES)


def test_results_sigterm_keeps_rows(tmp_path):
    out = tmp_path / "r.json"
    before = signal.getsignal(signal.SIGTERM)
    results = harness.Results(str(out), dict(torch="x", commit="c"), [harness.column("impl", "impl"), harness.NOTE])
    with results:
        results.add(harness.row(dict(what="t"), "a", "fwd", harness.metrics(1.0, 0.9, 1.1)))
        results.expect(harness.row(dict(what="t"), "b", "fwd", harness.failed("")))
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")  # pragma: no cover
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["impl"] for r in data["rows"]] == ["a", "b"]
    assert data["rows"][1]["note"].startswith("stopped by signal")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_budget_skips_with_a_note(tmp_path):
    args = harness.parse(harness.parser("t"), ["--device", "cpu", "--budget", "0", "--out-dir", str(tmp_path)],
                         "bench_x.py")
    assert args.out == str(tmp_path / "bench_x.json")
    results = harness.Results(args.out, {}, [harness.NOTE], budget=args.budget)
    with results:
        harness.measure_candidates(results, dict(what="t"), [("a", lambda x: x)], (torch.ones(2),), None, args)
    rows = json.loads((tmp_path / "bench_x.json").read_text())["rows"]
    assert len(rows) == 3 and all(r["note"].startswith("skipped: budget") and r["median_ms"] is None for r in rows)


def test_timing_helpers():
    cpu = torch.device("cpu")
    med, p20, p80 = harness.timed(lambda: torch.ones(10).sum(), cpu, warmup=0, repeat=5)
    assert 0 < p20 <= med <= p80
    assert harness.peak_mib(lambda: None, cpu) is None and harness.copy_bandwidth(cpu) is None
    assert harness.gemm_rate(cpu, torch.float32) is None
    assert harness.floor_pct(2.0, 1e6, 1e9) == pytest.approx(50.0) and harness.floor_pct(None, 1, 1) is None
    env = harness.environment(cpu, extra_key=1)
    assert env["torch"] == torch.__version__ and env["commit"] and env["cpu"] and env["extra_key"] == 1


def test_implemented_backends_asks_the_op():
    def op(backend):
        if backend == "cuda":
            raise RuntimeError("op: backend 'cuda' is not implemented for this op; implemented: ...")
        if backend == "triton":
            raise RuntimeError("op: backend 'triton' is not available: no GPU")

    assert harness.implemented_backends(op) == ["reference", "cpu", "triton"]
    import bench_hsim_split
    import bench_inner_attention
    import bench_nested_attention
    for mod in (bench_inner_attention, bench_nested_attention, bench_hsim_split):
        assert {"reference", "cpu"} <= set(mod.implemented()), mod.__name__


def test_plot_without_rows(tmp_path):
    pytest.importorskip("matplotlib")
    assert harness.plot([], str(tmp_path / "p.png"), {}) is None
    rows = [harness.row(dict(what="w", shape="s", batch=1, dtype="float32"), impl, "fwd+bwd", harness.metrics(ms))
            for impl, ms in (("ours_cpu", 1.0), ("base", 2.0))]
    assert harness.plot(rows, str(tmp_path / "p.png"), dict(cpu="c", torch="t", commit="x")) == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# ------------------------------------------------------------------ command lines and layout

def _suite_args():
    """The default arguments scripts/gpu_suite.sh gives each benchmark (INNER_ARGS="${INNER_ARGS---quick ...}")."""
    text = open(os.path.join(ROOT, "scripts", "gpu_suite.sh")).read()
    found = dict(re.findall(r'^(\w+)_ARGS="\$\{\1_ARGS-(.*)\}"$', text, flags=re.M))
    return {"bench_inner_attention": found["INNER"], "bench_nested_attention": found["NESTED"],
            "bench_hsim_split": found["HSIM"], "bench_train": found["TRAIN"]}


def test_gpu_suite_command_lines_parse():
    suite = _suite_args()
    text = open(os.path.join(ROOT, "scripts", "gpu_suite.sh")).read()
    for name in SCRIPTS:
        assert f"benchmarks/{name}.py" in text and f'--out "$OUT/{name}.json"' in text, name
        extra = ["--budget", "150"] if name == "bench_train" else []
        args = load(name).parse_args(shlex.split(suite[name]) + extra + ["--out", "/tmp/x.json"])
        assert args.quick and args.out == "/tmp/x.json", name
    args = load("bench_train").parse_args(["--steps", "3", "--warmup", "2", "--impls", "timm*", "--models", "tnt_s",
                                           "--amp", "none", "--rtnt-batch", "4", "--threads", "1", "--device", "cpu"])
    assert args.repeat == 3 and args.warmup == 2 and args.impls == ["timm*"] and args.rtnt_batch == [4]
    args = load("bench_inner_attention").parse_args(["--device", "cpu", "--what", "block", "--smoke", "--dtype", "float32"])
    assert args.quick and args.what == ["block"] and args.dtypes == ["float32"]


def test_scripts_run_as_scripts(tmp_path):
    """`python benchmarks/bench_x.py` imports the harness from its own folder (no file-path loading)."""
    for name in SCRIPTS:
        r = subprocess.run([sys.executable, os.path.join(BENCH_DIR, f"{name}.py"), "--help"], capture_output=True,
                           text=True, cwd=str(tmp_path), timeout=300)
        assert r.returncode == 0 and "--out-dir" in r.stdout and "--quick" in r.stdout, (name, r.stderr[-2000:])
    r = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "bench_train.py"), "--device", "cpu", "--quick", "--list"],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0 and "timm_eager" in r.stdout, r.stderr[-2000:]


def test_benchmarks_layout():
    """Every script imports the harness normally; none loads another by path, reaches into
    tntkernels.ops, or names anything outside the repository."""
    outside = "shared" + "/"  # the workspace folder beside the checkout
    for name in sorted(os.listdir(BENCH_DIR)):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(BENCH_DIR, name)).read()
        assert "spec_from_file_location" not in text and "tntkernels.ops" not in text, name
        assert outside not in text, name
        if name.startswith("bench_"):
            assert re.search(r"^import harness\b", text, flags=re.M), name
            for dup in ("def timed(", "def peak_mib(", "def copy_bandwidth(", "def environment(", "def plot(",
                        "def run_case(", "json.dump(", "argparse.ArgumentParser("):
                assert dup not in text, (name, dup)

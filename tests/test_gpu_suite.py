"""The GPU suite's helpers on CPU: scripts/sanitize.py without a GPU, the results collector and the
README performance-section writer (benchmarks/write_readme_perf.py), and gpu_suite.sh's syntax."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tntkernels import _backend

pytestmark = pytest.mark.integration  # subprocesses; CI: the GPU machine's stack (.ci/run)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZE = os.path.join(ROOT, "scripts", "sanitize.py")


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_sanitize(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # no GPU, also on a GPU machine
    return subprocess.run([sys.executable, SANITIZE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_sanitize_script_without_gpu():
    res = _run_sanitize("--allow-no-gpu")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "needs a CUDA GPU" in res.stdout and "nothing was run" in res.stdout
    res = _run_sanitize()
    assert res.returncode == 2, res.stdout + res.stderr
    assert "needs a CUDA GPU" in res.stdout


@pytest.mark.skipif(not _backend.cpp_available(), reason="tntkernels._C not built")
def test_sanitize_script_calls_match_the_op_schemas():
    """The same calls on the C++ CPU ops: every schema and argument order the GPU run relies on."""
    res = _run_sanitize("--device", "cpu", "--dtypes", "float32")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "calls OK" in res.stdout
    for op in ("inner_attention_backward", "nested_attention_backward[coda", "nested_attention_backward[realformer",
               "hsim_split_linear_backward[mix]", "hsim_split_linear_backward[block]"):
        assert op in res.stdout, op


def test_gpu_suite_script_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    res = subprocess.run([bash, "-n", os.path.join(ROOT, "scripts", "gpu_suite.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _bench_rows(what, impls_ms, shape="tnt_s", batch=256, dtype="bfloat16"):
    rows = []
    for impl, ms in impls_ms.items():
        for pas, f in (("fwd", 0.4), ("bwd", 0.6), ("fwd+bwd", 1.0)):
            rows.append(dict(what=what, shape=shape, batch=batch, dtype=dtype, impl=impl, pass_=pas,
                             median_ms=None if ms is None else ms * f, p20_ms=None, p80_ms=None,
                             peak_mib=None if ms is None else 10 * ms, note="" if ms else "RuntimeError: x"))
    return rows


def _synthetic_results(w):
    meta = dict(gpu="NVIDIA H100 80GB HBM3", driver="570.1", cuda="13.0", torch="2.11.0", triton="3.6.0",
                commit="abc1234", date="2030-01-01 00:00 UTC")
    inner = dict(meta=meta, rows=_bench_rows("attention", {"timm_eager": 2.0, "sdpa": 1.5, "ours_cuda": 0.5,
                                                           "ours_triton": 0.6, "flex_attention(compiled)": None}))
    train_rows = [
        dict(impl="timm_eager", model="tnt_s_patch16_224", group="tnt_s", ours=False, batch=64, img_per_s=1000.0,
             step_ms=64.0, step_ms_p20=63.0, step_ms_p80=65.0, peak_mib=9000.0, compile_s=None, note=""),
        dict(impl="timm+swap_in(triton)", model="tnt_s_patch16_224", group="tnt_s", ours=True, batch=64,
             img_per_s=1500.0, step_ms=42.7, step_ms_p20=42.0, step_ms_p80=43.0, peak_mib=7000.0, compile_s=None, note=""),
        dict(impl="timm_compile", model="tnt_s_patch16_224", group="tnt_s", ours=False, batch=64, img_per_s=None,
             step_ms=None, step_ms_p20=None, step_ms_p80=None, peak_mib=None, compile_s=None,
             note="skipped: budget of 100 s spent"),
        dict(impl="rtnt_ti", model="rtnt_ti_patch8_32", group="rtnt_ti", ours=True, batch=128, img_per_s=4000.0,
             step_ms=32.0, step_ms_p20=31.0, step_ms_p80=33.0, peak_mib=2000.0, compile_s=None, note=""),
        dict(impl="rtnt_ti(triton)", model="rtnt_ti_patch8_32", group="rtnt_ti", ours=True, batch=128,
             img_per_s=8000.0, step_ms=16.0, step_ms_p20=15.0, step_ms_p80=17.0, peak_mib=1500.0, compile_s=None, note=""),
    ]
    train = dict(meta=dict(meta, amp="bfloat16", optimizer="AdamW(fused)", steps=20), complete=True, rows=train_rows)
    return dict(meta=meta, tests=dict(passed=500, skipped=3, summary="500 passed, 3 skipped in 60.0s"),
                sanitizers=dict(memcheck=dict(result="clean"), racecheck=dict(result="errors")),
                benchmarks=dict(bench_inner_attention=inner, bench_train=train))


def test_write_readme_perf_replaces_the_section(tmp_path):
    w = load("benchmarks/write_readme_perf.py", "write_readme_perf")
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    original = readme.read_text()
    assert w.START in original and w.END in original
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_synthetic_results(w)))
    section_md = tmp_path / "section.md"
    assert w.main([str(results), "--readme", str(readme), "--section-out", str(section_md)]) == 0
    text = readme.read_text()
    assert text.count(w.START) == 1 and text.count(w.END) == 1
    section = text[text.index(w.START):text.index(w.END)]
    assert w.PLACEHOLDER not in section
    assert "NVIDIA H100 80GB HBM3" in section and "torch 2.11.0" in section and "abc1234" in section
    assert "500 passed" in section and "memcheck: clean" in section and "racecheck: errors" in section
    # inner attention: fastest ours (cuda, 0.5 ms) vs fastest baseline (sdpa, 1.5 ms) = 3.00x
    row = next(line for line in section.splitlines() if line.startswith("| attention tnt_s B=256 bfloat16"))
    assert "ours_cuda" in row and "sdpa" in row and "3.00×" in row
    assert "1.50×" in section  # train: swap_in over timm_eager
    assert "2.00×" in section  # rtnt: triton over the default backend
    assert "skipped: budget" in section
    assert section_md.read_text().strip() in text
    # everything outside the markers is unchanged, and a second run gives the same file
    assert text[:text.index(w.START)] == original[:original.index(w.START)]
    assert text[text.index(w.END):] == original[original.index(w.END):]
    w.main([str(results), "--readme", str(readme)])
    assert readme.read_text() == text


def test_write_readme_perf_adds_missing_markers_at_end_of_status():
    w = load("benchmarks/write_readme_perf.py", "write_readme_perf")
    readme = "# x\n\n## Status\n\nsome status.\n\n## Layout\n\nfiles\n"
    new = w.replace_section(readme, "TABLE\n")
    assert new.index("some status.") < new.index(w.START) < new.index("TABLE") < new.index(w.END) < new.index("## Layout")
    assert w.replace_section(new, "OTHER\n") == new.replace("TABLE", "OTHER")
    assert w.replace_section("# x\n", "T\n").endswith(f"{w.START}\nT\n{w.END}\n")


def test_collect_combines_a_suite_folder(tmp_path):
    w = load("benchmarks/write_readme_perf.py", "write_readme_perf")
    (tmp_path / "steps.tsv").write_text("build\t0\t95\tlimit 300 s\ntests\t1\t80\tlimit 200 s\n"
                                        "sanitize_memcheck\t0\t40\tlimit 150 s\nsanitize_racecheck\t1\t50\tlimit 150 s\n"
                                        "bench_train\t124\t170\tlimit 170 s\nbench_hsim_split\t-\t0\tnot run: suite budget spent\n")
    (tmp_path / "tests.log").write_text("....F..\nFAILED tests/test_x.py::t - boom\n"
                                        "1 failed, 420 passed, 7 skipped, 600 deselected, 2 warnings in 75.12s (0:01:15)\n")
    (tmp_path / "sanitize_memcheck.log").write_text("========= COMPUTE-SANITIZER\nsanitize: 210 calls OK\n"
                                                    "========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "sanitize_racecheck.log").write_text("========= Error: Race reported between Write access ...\n"
                                                     "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n")
    (tmp_path / "env.json").write_text(json.dumps(dict(gpu="NVIDIA H200", driver="575.0", cuda="13.0", torch="2.11.0",
                                                       triton="3.6.0", commit="deadbee")))
    (tmp_path / "bench_train.json").write_text(json.dumps(dict(meta=dict(torch="2.11.0"), complete=False, rows=[])))
    (tmp_path / "bench_broken.json").write_text("{not json")
    assert w.main(["--collect", str(tmp_path), "--no-readme", "--section-out", str(tmp_path / "s.md")]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["meta"]["gpu"] == "NVIDIA H200" and r["meta"]["commit"] == "deadbee" and r["meta"]["date"]
    assert (r["tests"]["failed"], r["tests"]["passed"], r["tests"]["skipped"], r["tests"]["deselected"]) == (1, 420, 7, 600)
    assert r["tests"]["rc"] == 1
    assert r["sanitizers"]["memcheck"]["result"] == "clean"
    assert r["sanitizers"]["racecheck"]["result"] == "errors"
    assert "RACECHECK SUMMARY" in r["sanitizers"]["racecheck"]["tail"]
    assert r["steps"]["bench_train"]["rc"] == 124 and r["steps"]["bench_hsim_split"]["rc"] is None
    assert r["benchmarks"]["bench_train"]["complete"] is False and "error" in r["benchmarks"]["bench_broken"]
    section = (tmp_path / "s.md").read_text()
    assert "NVIDIA H200" in section and "cut short" in section and "1 failed" in section


def test_gpu_test_runner_finds_the_gpu_files():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_gpu_tests", os.path.join(ROOT, "scripts", "run_gpu_tests.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = {str(p.relative_to(mod.ROOT)) for p in mod.gpu_test_files()}
    assert {"tests/ops/test_fuzz.py", "tests/ops/triton/test_nested_attention.py", "tests/ops/test_second_device.py",
            "tests/models/test_models.py"} <= names
    assert "tests/test_data.py" not in names
    assert mod.counts("x\n3 passed, 2 skipped, 1 failed in 2.5s\n") == {"passed": 3, "skipped": 2, "failed": 1}


def test_gpu_suite_verdict_dry_run_on_cpu(tmp_path):
    """The verdict step's plumbing without a GPU: per-file pytest runs (every GPU test skips here),
    sanitizers recorded as not run, steps.tsv, results.json and the README section written."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), README="none", STEPS="tests,sanitize", TEST_JOBS="2",
               TEST_FILES="tests/ops/test_second_device.py", PATH=os.environ.get("PATH", ""), PYTHON=sys.executable)
    res = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_suite.sh"), "verdict"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    steps = (out / "steps.tsv").read_text()
    assert "\ntests\t0\t" in "\n" + steps and "sanitize_memcheck\t-\t0\tnot run" in steps
    results = json.loads((out / "results.json").read_text())
    assert "skipped" in results["tests"]["summary"]
    assert (out / "README_perf.md").exists() and (out / "tests").is_dir()
    res = subprocess.run([bash, os.path.join(ROOT, "scripts", "gpu_suite.sh"), "nonsense"], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr

"""Smoke runs of the benchmark scripts on CPU: they run end to end and write what they promise."""
import importlib.util
import json
import os

import pytest

from tntkernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_inner_attention_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "cpu.json"
    load("bench_inner_attention").main(["--device", "cpu", "--quick", "--batch", "1", "--shapes", "tnt_s",
                                        "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["commit"] is not None
    impls = {(r["what"], r["impl"]) for r in data["rows"]}
    assert {("attention", "timm_eager"), ("attention", "sdpa"), ("inner_block", "timm_eager")} <= impls
    if _backend.cpp_available():
        assert ("attention", "ours_cpu") in impls and ("inner_block", "ours_cpu") in impls
    assert all(r["median_ms"] > 0 for r in data["rows"] if r["impl"] in ("timm_eager", "ours_cpu"))
    assert {r["pass_"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "cpu.png").stat().st_size > 0


def test_bench_nested_attention_smoke(tmp_path):
    out = tmp_path / "nested.json"
    load("bench_nested_attention").main(["--device", "cpu", "--quick", "--batch", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"]
    impls = {(r["what"], r["shape"], r["impl"]) for r in data["rows"]}
    for shape in ("inner", "outer"):
        assert ("nested_coda", shape, "eager(reference)") in impls
        assert ("nested_realformer", shape, "sdpa+logits") in impls
    assert all(r["median_ms"] > 0 for r in data["rows"] if r["impl"] in ("eager(reference)", "sdpa+logits"))
    assert {r["pass_"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}


def test_bench_hsim_split_smoke(tmp_path):
    out = tmp_path / "hsim.json"
    load("bench_hsim_split").main(["--device", "cpu", "--quick", "--threads", "1", "--rows", "32",
                                   "--shapes", "d768", "--dtype", "float32", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["commit"] is not None
    impls = {r["impl"] for r in data["rows"]}
    assert {"tint_reference_form", "bmm", "dense_gemm", "ours_reference"} <= impls
    if _backend.cpp_available() and "cpu" in data["meta"]["backends_implemented"]:
        assert "ours_cpu" in impls
    for r in data["rows"]:
        assert r["median_ms"] is not None and r["median_ms"] > 0, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["max_abs_err"] < 1e-3, r  # every candidate computes the same map
    assert {r["pass_"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "hsim.png").stat().st_size > 0


def test_bench_train_smoke(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "train.json"
    rows = load("bench_train").main(["--device", "cpu", "--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] and data["meta"]["commit"] is not None and data["complete"] is True
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
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "train.png").stat().st_size > 0

"""Triton backend of inner_attention: interpreter runs on CPU, AOT compiles for sm_80 / sm_90, GPU runs.

Sessions (markers mapped to skips in tests/conftest.py):
    interpreter  the kernels on CPU tensors under TRITON_INTERPRET=1, compared with an fp64 oracle by
                 the 2×-PyTorch rule: `TRITON_INTERPRET=1 python -m pytest -m interpreter tests`
    aot          triton.compile for sm_80 / sm_90, no GPU: `python -m pytest -m aot tests`
                 (TNTKERNELS_AOT=all: every configuration)
    gpu          the kernels on a CUDA device
Unmarked: configurations and dispatch without the interpreter.
"""
import importlib
import os
import subprocess
import sys
import time

import pytest
import torch

import tntkernels
from helpers import aot
from helpers.inputs import attention_inputs
from helpers.oracle import assert_2x_pytorch

ia = importlib.import_module("tntkernels.ops.triton.inner_attention")

# (S, H, m, d, dv, layout): "qkv" = permuted views of one Linear output (S, m, 3·H·d), like timm's
# Attention; "t" = transposed (S, m, H, ·) buffers; "c" = contiguous. S·H is not a multiple of
# PAIRS_PER_PROG in (2, 3, 9, 10, 10), (5, 2, 4, 12, 20) and (3, 3, 16, 6, 6).
CASES = [
    (3, 2, 16, 6, 6, "qkv"),   # TNT-S-like
    (3, 3, 16, 6, 6, "t"),
    (2, 3, 9, 10, 10, "qkv"),  # TNT-B head_dim, m = 9
    (1, 1, 1, 6, 6, "c"),      # m = 1
    (5, 2, 4, 12, 20, "t"),    # dv != d
    (1, 2, 49, 10, 6, "c"),    # m = 49 (BLOCK_M = 64)
]
DTYPES = {"float32": (torch.float32, 1e-6), "float16": (torch.float16, 1e-3)}
# (S, H, m, d, dv) of the GPU test (helpers/aot.py REAL_SHAPES holds each, so the AOT set compiles their launches)
GPU_SHAPES = [(75_000, 4, 16, 6, 6), (300, 4, 16, 10, 10), (50, 3, 49, 10, 10), (40, 2, 9, 12, 20),
              (30, 2, 64, 64, 64), (20, 3, 1, 6, 6)]


def _make_inputs(S, H, m, d, dv, layout, dtype, seed):
    """q, k, v, dout (helpers.inputs)."""
    return attention_inputs(S, H, m, d, dv, layout=layout, dtype=dtype, seed=seed)


def _run_triton(q, k, v, dout, scale):
    """out, lse, dq, dk, dv through the public API (custom op + autograd) and the launchers."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = tntkernels.inner_attention(q, k, v, scale=scale, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    _, lse = ia.inner_attention_forward(q.detach(), k.detach(), v.detach(), scale)
    return [t.detach() for t in (out, lse, dq, dk, dv)]


def _check_2x_rule(q, k, v, dout, scale, ours, floor, lse_atol):
    """out, dq, dk, dv against the fp64 oracle (2×-PyTorch rule); lse against fp64 within lse_atol."""
    out, lse, dq, dk, dv = ours
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    exact = tntkernels.inner_attention_ref(*leaves64, scale)
    grads64 = torch.autograd.grad(exact, leaves64, dout.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = tntkernels.inner_attention_ref(*leaves, scale)
    grads = torch.autograd.grad(low, leaves, dout)
    assert_2x_pytorch(out, low, exact, floor, "out")
    for name, a, pt, ex in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, grads64):
        assert_2x_pytorch(a, pt, ex, floor, name)
    lse_exact = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) * scale, dim=-1)
    assert lse.shape == lse_exact.shape  # fp32 logits and softmax also for fp16 inputs
    assert (lse.double() - lse_exact).abs().max().item() <= lse_atol


# ---------------------------------------------------------------------------------------------
# Interpreter (TRITON_INTERPRET=1 session)
# ---------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"S{c[0]}H{c[1]}m{c[2]}d{c[3]}dv{c[4]}{c[5]}" for c in CASES])
def test_interpreter_forward_grads_lse_2x_rule_deterministic(idx, dname):
    dtype, floor = DTYPES[dname]
    case = CASES[idx]
    q, k, v, dout = _make_inputs(*case, dtype, seed=idx)
    assert not q.is_contiguous() or case[-1] == "c"
    scale = case[3] ** -0.5
    ours = _run_triton(q, k, v, dout, scale)
    for a, b in zip(ours, _run_triton(q, k, v, dout, scale)):
        assert torch.equal(a, b), "two runs differ"
    out, lse, dq = ours[:3]
    assert out.dtype == dtype and lse.dtype == torch.float32 and dq.dtype == dtype
    _check_2x_rule(q, k, v, dout, scale, ours, floor, lse_atol=1e-5)


@pytest.mark.interpreter
def test_interpreter_opcheck():
    q, k, v, dout = _make_inputs(2, 2, 5, 6, 10, "t", torch.float32, seed=99)
    torch.library.opcheck(torch.ops.tntkernels.inner_attention_triton, (q, k, v, 0.3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.tntkernels.inner_attention_triton, (q, k, v, 0.3))


# ---------------------------------------------------------------------------------------------
# Configurations (plain Python) and AOT compilation (no GPU needed)
# ---------------------------------------------------------------------------------------------

def test_configs_cover_every_launch():
    configs = ia.triton_configs()
    assert len(configs) == len(set(configs)) == 81
    keys = {(c[0], c[1], c[2], c[4]) for c in configs}
    for m in range(1, 65):
        for d in range(1, 65, 3):
            for dv in (1, 6, 17, 64):
                bm, bd, bdv, pairs, warps = ia.triton_config(m, d, dv)
                assert bm >= max(16, m) and bd >= max(16, d) and bdv >= max(16, dv)
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    assert (bm, bd, bdv, pairs, dtype, warps) in configs
                    assert (bm, bd, bdv, dtype) in keys
    assert ia.triton_config(16, 6, 6)[3] == 8  # TNT-S: several pairs per program


@pytest.mark.triton
def test_aot_default_set_covers_the_gpu_tests():
    """The default AOT set holds what the GPU test and the model shapes launch, and nothing the
    launchers cannot choose."""
    jobs = aot.default_jobs("inner_attention")
    for S, H, m, d, dv in GPU_SHAPES:  # with the GPU test's layout
        assert (S, H, m, d, dv, "qkv" if d == dv else "t") in aot.REAL_SHAPES["inner_attention"].values()
    assert {j.key for j in jobs} <= {j.key for j in aot.every_job("inner_attention")}
    assert {j.dtype for j in jobs} == {"fp32", "fp16", "bf16"} and {j.arch for j in jobs} == set(aot.ARCHS)


@pytest.mark.aot
def test_aot_compile_dispatched_configs():
    """Both kernels of every configuration the real shapes launch (TNT-S / TNT-B inner, RTNT letters and
    words, the GPU test's shapes: tl.dot's K >= 16 rule bites 16-bit inputs), fp32 / fp16 / bf16, sm_80 and sm_90:
    PTX for the architecture, tensor-core mma for 16-bit inputs (resources: test_resources.py)."""
    jobs = list(aot.default_jobs("inner_attention"))
    for job, res in zip(jobs, aot.compile_all(jobs)):  # a kernel over the shared-memory limit stops
        assert res.built or aot.over_limit(job, res), job.id  # at the LLVM IR (test_resources.py)


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.skipif(not aot.sweep_requested(), reason="every configuration: TNTKERNELS_AOT=all")
def test_aot_compile_every_config():
    """Every configuration the launcher can choose: 81 × 2 kernels × sm_80 / sm_90."""
    start = time.perf_counter()
    jobs = aot.every_job("inner_attention")
    results = aot.compile_all(jobs)
    assert len(results) == len(jobs) == 81 * 2 * 2
    aot.report_sweep(jobs, results, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Dispatch without the interpreter, and the GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.triton
def test_triton_on_cpu_needs_the_interpreter():
    q = torch.randn(2, 2, 4, 6)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tntkernels.inner_attention(q, q, q, backend="triton")


def test_unsupported_shapes_raise():
    """The launchers check the range first (before any triton call): the registry's message."""
    q = torch.randn(1, 1, 65, 6)
    with pytest.raises(ValueError, match="inner_attention: the 'triton' backend does not support m=65"):
        ia.inner_attention_forward(q, q, q, 1.0)
    assert ia.unsupported(torch.randn(1, 1, 16, 6), torch.randn(1, 1, 16, 6)) is None
    assert "1 <= d, dv <= 64" in ia.unsupported(torch.randn(1, 1, 16, 65), torch.randn(1, 1, 16, 6))
    x = torch.randn(1, 1, 4, 6).double()
    assert "float32, float16 and bfloat16" in ia.unsupported(x, x)


_NO_TRITON = """
import importlib.abc, importlib.util, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "triton" else _find_spec(name, *a)
import torch, tntkernels
q = torch.randn(2, 2, 4, 6)
assert torch.allclose(tntkernels.inner_attention(q, q, q), tntkernels.inner_attention_ref(q, q, q), atol=1e-6)
try:
    tntkernels.inner_attention(q, q, q, backend="triton")
except RuntimeError as exc:
    assert "not installed" in str(exc), exc
else:
    raise AssertionError("backend='triton' without triton did not raise")
assert "triton" not in sys.modules
"""


def test_import_without_triton():
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TNTKERNELS_BACKEND="", TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_2x_rule_and_determinism(shape, dtype, floor):
    S, H, m, d, dv = shape
    layout = "qkv" if d == dv else "t"
    q, k, v, dout = (t.cuda() for t in _make_inputs(S, H, m, d, dv, layout, dtype, seed=0))
    scale = d ** -0.5
    ours = _run_triton(q, k, v, dout, scale)
    for a, b in zip(ours, _run_triton(q, k, v, dout, scale)):
        assert torch.equal(a, b)
    _check_2x_rule(q, k, v, dout, scale, ours, floor, lse_atol=1e-4)

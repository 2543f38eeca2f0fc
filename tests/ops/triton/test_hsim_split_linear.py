"""Triton kernels of the H_sim-split linear op: interpreter on CPU, AOT for sm_80 / sm_90, GPU.

Sessions as tests/ops/triton/test_inner_attention.py: `interpreter` tests run the kernels on CPU under
TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 python -m pytest -m interpreter tests`) and compare y and every
gradient with `hsim_split_linear_ref` in fp64 under the 2×-PyTorch rule and with the dense-matrix
oracle; `aot` tests compile for sm_80 / sm_90 (`python -m pytest -m aot tests`); `gpu` tests need a
CUDA device.
"""
import importlib
import os
import time

import pytest
import torch

from helpers import aot
from helpers.inputs import hsim_inputs
from helpers.oracle import assert_2x_pytorch
from tntkernels import hsim_split_linear, hsim_split_linear_ref

hst = importlib.import_module("tntkernels.ops.triton.hsim_split_linear")


def _triton(x, mix_weight=None, mix_bias=None, block_weight=None, block_bias=None):
    """The public op on the Triton backend (checks + dispatch + custom op)."""
    return hsim_split_linear(x, mix_weight, mix_bias, block_weight, block_bias, backend="triton")


# (lead shape, H, d, parts, biases, layout): parts "mb" (mix + block), "m", "b"; biases True / False;
# layout "c" contiguous, "t" x a transposed view (rows strided), "s" x a column slice of a wider buffer.
CASES = [
    ((37,), 4, 16, "mb", True, "c"),       # d = 16: one k-chunk, BLOCK_J 64 masked
    ((2, 9), 3, 32, "mb", False, "t"),     # leading dims, no biases, strided rows
    ((65,), 2, 48, "m", True, "c"),        # mix only, d not a power of two; 2 row tiles
    ((40,), 3, 64, "b", True, "s"),        # block only, x a slice
    ((5,), 1, 80, "mb", True, "c"),        # H = 1, d = 80 (BLOCK_J 128), fewer rows than a tile
    ((3,), 12, 16, "mb", True, "c"),       # H = 12 (TinT's H_sim), N < splits · rows
    ((1,), 2, 7, "mb", True, "c"),         # N = 1, d = 7 (not a multiple of 16)
    ((0,), 3, 16, "mb", True, "c"),        # N = 0
    ((33,), 2, 160, "b", False, "c"),      # d = 160: BLOCK_J 256, 5 k-chunks
]
DTYPES = {"float32": (torch.float32, 1e-5), "float16": (torch.float16, 1e-3)}
# GPU test cases, as CASES (helpers/aot.py REAL_SHAPES holds each, so the AOT set compiles their launches)
GPU_CASES = [
    ((2304,), 12, 256, "mb", True, "c"),    # TinT for OPT-125M
    ((1280,), 12, 64, "mb", True, "t"),     # D 768
    ((8192,), 12, 64, "b", True, "c"),
    ((777,), 12, 256, "m", True, "s"),
    ((3, 100), 5, 48, "mb", False, "c"),
]
_IDS = [f"N{'x'.join(map(str, c[0]))}-H{c[1]}-d{c[2]}-{c[3]}-bias{int(c[4])}-{c[5]}" for c in CASES]


def _make(lead, H, d, parts, biases, layout, dtype, seed):
    """x, (M, m, A, a) and the upstream gradient (helpers.inputs)."""
    return hsim_inputs(lead, H, d, parts=parts, biases=biases, layout=layout, dtype=dtype, seed=seed)


def _run(fn, x, params, grad_y, dtype):
    """y and the gradients of x and every present parameter."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, *params)]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, grad_y.to(dtype), allow_unused=True)
    return [y.detach()] + [g.detach() if g is not None else torch.zeros_like(t) for g, t in zip(grads, present)]


# ---------------------------------------------------------------------------------------------
# Interpreter (TRITON_INTERPRET=1 session)
# ---------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)), ids=_IDS)
def test_interpreter_output_and_grads_2x_rule_deterministic(idx, dname):
    dtype, floor = DTYPES[dname]
    case = CASES[idx]
    x, params, gy = _make(*case, dtype, seed=idx)
    ours = _run(_triton, x, params, gy, dtype)
    again = _run(_triton, x, params, gy, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours, again)), "two runs differ"
    exact = _run(hsim_split_linear_ref, x, params, gy, torch.float64)
    low = _run(hsim_split_linear_ref, x, params, gy, dtype)
    names = ["y", "dx"] + [n for n, t in zip(("dM", "dm", "dA", "da"), params) if t is not None]
    assert len(ours) == len(exact) == len(names)
    for name, a, pt, ex in zip(names, ours, low, exact):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_2x_pytorch(a, pt, ex, floor, name)


@pytest.mark.interpreter
def test_interpreter_matches_dense_oracle():
    """The composite (public entry point: checks + dispatch) equals x @ W_dense + bias with
    W_dense[(h,k),(g,j)] = M[k,h,g] A[g][k,j] (tint.md §1)."""
    from ops.test_hsim_split_linear import dense_oracle  # tests/ is on sys.path (conftest.py)

    x, params, _ = _make(*CASES[0], torch.float32, seed=0)
    y = _triton(x, *params)
    W, bias = dense_oracle(*(p.double() for p in params))
    assert torch.allclose(y.double(), x.double() @ W + bias, atol=1e-4)


@pytest.mark.interpreter
@pytest.mark.parametrize("i", (0, 2, 3))
def test_interpreter_opcheck(i):
    x, params, gy = _make(*CASES[i], torch.float32, seed=40 + i)
    torch.library.opcheck(torch.ops.tntkernels.hsim_split_linear_triton, (x.contiguous(), *params))
    torch.library.opcheck(torch.ops.tntkernels.hsim_split_linear_triton_backward,
                          (gy.contiguous(), x.contiguous(), *params, [True] * 5))  # needs: every gradient


_OUT_OF_RANGE = (((4, 2 * 300), (None, None, (2, 300, 300)), "d <= 256"), ((4, 65), ((1, 65, 65),), "H <= 64"))


def test_unsupported_inputs_raise():
    """The launchers check the range first (before any triton call), with the registry's message."""
    for x_shape, shapes, what in _OUT_OF_RANGE:
        x, w = torch.randn(*x_shape), [None if s is None else torch.randn(*s) for s in shapes]
        w += [None] * (4 - len(w))
        with pytest.raises(ValueError, match=f"hsim_split_linear: the 'triton' backend does not support .*{what}"):
            hst.hsim_split_linear_forward(x, *w)
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        hst.hsim_split_linear_forward(x, None, None, torch.randn(2, 4, 4, dtype=torch.float64), None)


@pytest.mark.interpreter
def test_interpreter_unsupported_inputs_raise_through_the_registry():
    for x_shape, shapes, what in _OUT_OF_RANGE:
        x, w = torch.randn(*x_shape), [None if s is None else torch.randn(*s) for s in shapes]
        with pytest.raises(ValueError, match=f"hsim_split_linear: the 'triton' backend does not support .*{what}"):
            _triton(x, *w)
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        _triton(x, None, None, torch.randn(2, 4, 4, dtype=torch.float64))


@pytest.mark.triton
def test_triton_on_cpu_needs_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hsim_split_linear(x, None, None, torch.randn(2, 4, 4), backend="triton")


# ---------------------------------------------------------------------------------------------
# Configurations and AOT compilation (no GPU needed)
# ---------------------------------------------------------------------------------------------

def test_configs_cover_every_launch():
    configs = hst.triton_configs()
    block = {(c["dtype"], c["BLOCK_J"], c["HAS_MIX"], c["PRECISION"], c["BLOCK_N"], c["num_warps"])
             for c in configs["_hsim_split_linear_block_kernel"]}
    for d in (1, 16, 64, 65, 128, 160, 256):
        for dtype in hst.DTYPES:
            for precision in hst._precisions(dtype):
                for has_mix in (0, 1):
                    for bn, warps in hst._TUNE:
                        assert (dtype, hst.block_j(d), has_mix, precision, bn, warps) in block
    assert len(configs["_hsim_split_linear_block_kernel"]) == 3 * 4 * 2 * 2 and len(configs["_hsim_split_linear_mix_kernel"]) == 3 * 2
    assert len(configs["_hsim_split_linear_wgrad_kernel"]) == 3 * 4 * 2


@pytest.mark.triton
def test_aot_default_set_covers_the_gpu_tests():
    """The default AOT set holds what the GPU test and TinT launch (the autotuner compiles both block
    configurations; IEEE fp32, torch's default), and nothing the launchers cannot choose."""
    shapes = aot.REAL_SHAPES["hsim_split_linear"].values()
    for case in GPU_CASES:
        assert case in shapes, case
    jobs = aot.default_jobs("hsim_split_linear")
    assert {j.key for j in jobs} <= {j.key for j in aot.every_job("hsim_split_linear")}
    assert {j.kernel for j in jobs} == {"_hsim_split_linear_block_kernel", "_hsim_split_linear_mix_kernel", "_hsim_split_linear_wgrad_kernel"}
    assert {dict(j.constexprs).get("BLOCK_J") for j in jobs} == {None, 64, 256}


@pytest.mark.aot
def test_aot_compile_dispatched_configs():
    """Every kernel the real shapes launch (TinT D 768 / 3072 with H 12: d 64 / 256, mix + block, block,
    mix; the GPU test's shapes) in fp32 / fp16 / bf16, for sm_80 and sm_90: PTX for the architecture,
    tensor-core mma for 16-bit tl.dot (resources: test_resources.py)."""
    jobs = list(aot.default_jobs("hsim_split_linear"))
    for job, res in zip(jobs, aot.compile_all(jobs)):  # a kernel over the shared-memory limit stops
        assert res.built or aot.over_limit(job, res), job.id  # at the LLVM IR (test_resources.py)


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.skipif(not aot.sweep_requested(), reason="every configuration: TNTKERNELS_AOT=all")
def test_aot_compile_every_config():
    """Every configuration the launchers and the autotuner can choose × sm_80 / sm_90."""
    start = time.perf_counter()
    jobs = aot.every_job("hsim_split_linear")
    results = aot.compile_all(jobs)
    assert len(results) == len(jobs) == 2 * (48 + 6 + 24)
    aot.report_sweep(jobs, results, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=lambda c: f"N{c[0]}-H{c[1]}-d{c[2]}-{c[3]}" if isinstance(c, tuple) else None)
def test_gpu_2x_rule_and_determinism(case, dtype, floor):
    x, params, gy = _make(*case, dtype, seed=0)
    x, gy = x.cuda(), gy.cuda()
    params = tuple(p.cuda() if p is not None else None for p in params)
    ours = _run(_triton, x, params, gy, dtype)
    again = _run(_triton, x, params, gy, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))
    exact = _run(hsim_split_linear_ref, x, params, gy, torch.float64)
    low = _run(hsim_split_linear_ref, x, params, gy, dtype)
    for i, (a, pt, ex) in enumerate(zip(ours, low, exact)):
        assert_2x_pytorch(a, pt, ex, floor, f"output {i}")

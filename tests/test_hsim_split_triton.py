"""Triton kernels of the H_sim-split linear op: interpreter on CPU, AOT for sm_80 / sm_90, GPU.

Triton decides between the interpreter and the compiler when `@triton.jit` runs (at import), so the
interpreter checks run this file as a script in a subprocess with TRITON_INTERPRET=1 (`_worker`):
it writes y and every gradient (twice, for determinism) and the tests here compare them with
`hsim_split_linear_ref` in fp64 under the 2×-PyTorch rule and with the dense-matrix oracle.
"""
import importlib
import os
import subprocess
import sys
import time

import _aot
import pytest
import torch

if __name__ != "__main__":
    from conftest import assert_2x_pytorch

hst = importlib.import_module("tntkernels.ops.hsim_split_triton")
from tntkernels.ops.hsim_split import hsim_split_linear, hsim_split_linear_ref  # noqa: E402

triton = pytest.importorskip("triton") if __name__ != "__main__" else None

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
_IDS = [f"N{'x'.join(map(str, c[0]))}-H{c[1]}-d{c[2]}-{c[3]}-bias{int(c[4])}-{c[5]}" for c in CASES]


def _make(lead, H, d, parts, biases, layout, dtype, seed):
    """x, (M, m, A, a) (absent parts / biases None) and the upstream gradient, in dtype."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    D = H * d
    if layout == "t":
        x = randn(*lead[::-1], D).transpose(0, 1) if len(lead) == 2 else randn(*lead, D)
    elif layout == "s":
        x = randn(*lead, D + 5)[..., 3:3 + D]
    else:
        x = randn(*lead, D)
    M = randn(d, H, H, std=H ** -0.5) if "m" in parts else None
    m = randn(d, H, std=0.5) if "m" in parts and biases else None
    A = randn(H, d, d, std=d ** -0.5) if "b" in parts else None
    a = randn(H, d, std=0.5) if "b" in parts and biases else None
    return x, (M, m, A, a), randn(*lead, D)


def _run(fn, x, params, grad_y, dtype):
    """y and the gradients of x and every present parameter."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, *params)]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, grad_y.to(dtype), allow_unused=True)
    return [y.detach()] + [g.detach() if g is not None else torch.zeros_like(t) for g, t in zip(grads, present)]


def _worker(out_path):
    """Run under TRITON_INTERPRET=1: every case in every dtype, twice, plus opcheck of the custom ops."""
    results = {}
    for dname, (dtype, _) in DTYPES.items():
        for i, case in enumerate(CASES):
            x, params, gy = _make(*case, dtype, seed=i)
            results[(dname, i)] = tuple(_run(hst.hsim_split_linear_triton, x, params, gy, dtype) for _ in range(2))
    for i in (0, 2, 3):
        x, params, gy = _make(*CASES[i], torch.float32, seed=40 + i)
        torch.library.opcheck(torch.ops.tntkernels.hsim_split_linear_triton, (x.contiguous(), *params))
        torch.library.opcheck(torch.ops.tntkernels.hsim_split_linear_triton_backward,
                              (gy.contiguous(), x.contiguous(), *params))
    # through the public entry point (checks + dispatch)
    x, params, gy = _make(*CASES[0], torch.float32, seed=0)
    results["public"] = hsim_split_linear(x, *params, backend="triton")
    results["opcheck"] = True
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("hsim_triton_interp") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", TNTKERNELS_BACKEND="")
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return torch.load(path)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)), ids=_IDS)
def test_interpreter_output_and_grads_2x_rule(interpreted, idx, dname):
    dtype, floor = DTYPES[dname]
    case = CASES[idx]
    ours, _ = interpreted[(dname, idx)]
    x, params, gy = _make(*case, dtype, seed=idx)
    exact = _run(hsim_split_linear_ref, x, params, gy, torch.float64)
    low = _run(hsim_split_linear_ref, x, params, gy, dtype)
    names = ["y", "dx"] + [n for n, t in zip(("dM", "dm", "dA", "da"), params) if t is not None]
    assert len(ours) == len(exact) == len(names)
    for name, a, pt, ex in zip(names, ours, low, exact):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_2x_pytorch(a, pt, ex, floor, name)


def test_interpreter_matches_dense_oracle(interpreted):
    """The composite equals x @ W_dense + bias with W_dense[(h,k),(g,j)] = M[k,h,g] A[g][k,j] (tint.md §1)."""
    from test_hsim_split import dense_oracle

    x, params, _ = _make(*CASES[0], torch.float32, seed=0)
    W, bias = dense_oracle(*(p.double() for p in params))
    assert torch.allclose(interpreted["public"].double(), x.double() @ W + bias, atol=1e-4)


def test_interpreter_deterministic_and_opcheck(interpreted):
    assert interpreted["opcheck"]
    for key, runs in interpreted.items():
        if key in ("opcheck", "public"):
            continue
        first, second = runs
        assert all(torch.equal(a, b) for a, b in zip(first, second)), f"{key}: two runs differ"


def test_unsupported_inputs_raise():
    x = torch.randn(4, 2 * 300)
    with pytest.raises(ValueError, match="d <= 256"):
        hst.hsim_split_linear_triton(x, None, None, torch.randn(2, 300, 300))
    x = torch.randn(4, 65)
    with pytest.raises(ValueError, match="H <= 64"):
        hst.hsim_split_linear_triton(x, torch.randn(1, 65, 65))
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        hst.hsim_split_linear_triton(x, None, None, torch.randn(2, 4, 4, dtype=torch.float64))


def test_triton_on_cpu_needs_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hsim_split_linear(x, None, None, torch.randn(2, 4, 4), backend="triton")


# ---------------------------------------------------------------------------------------------
# Configurations and AOT compilation (no GPU needed)
# ---------------------------------------------------------------------------------------------

_TYPES = {"X": "x", "Y": "x", "X0": "x", "DY": "x", "M": "x", "MB": "x", "A": "x", "AB": "x",
          "dMp": "*fp32", "dmp": "*fp32", "dAp": "*fp32", "dap": "*fp32"}


def _jobs(configs):
    """_aot jobs for every (kernel, configuration), sm_80 and sm_90."""
    jobs = []
    for kernel, entries in configs.items():
        for entry in entries:
            entry = dict(entry)
            dtype, warps = entry.pop("dtype"), entry.pop("num_warps")
            types = {name: _aot.pointer(dtype) if t == "x" else t for name, t in _TYPES.items()}
            mma = dtype != torch.float32 and kernel != "_mix_kernel"
            jobs += [("tntkernels.ops.hsim_split_triton", kernel, entry, types, arch, warps, mma)
                     for arch in _aot.ARCHS]
    return jobs


def test_configs_cover_every_launch():
    configs = hst.triton_configs()
    block = {(c["dtype"], c["BLOCK_J"], c["HAS_MIX"], c["PRECISION"], c["BLOCK_N"], c["num_warps"])
             for c in configs["_block_kernel"]}
    for d in (1, 16, 64, 65, 128, 160, 256):
        for dtype in hst._DTYPES:
            for precision in hst._precisions(dtype):
                for has_mix in (0, 1):
                    for bn, warps in hst._TUNE:
                        assert (dtype, hst.block_j(d), has_mix, precision, bn, warps) in block
    assert len(configs["_block_kernel"]) == 3 * 4 * 2 * 2 and len(configs["_mix_kernel"]) == 3 * 2
    assert len(configs["_block_wgrad_kernel"]) == 3 * 4 * 2


def test_aot_compile_representative_configs():
    """TinT for OPT-125M (D 3072, H 12, d 256) in bf16: every kernel, one configuration each."""
    configs = {kernel: [c for c in entries if c["dtype"] == torch.bfloat16 and c.get("BLOCK_J", 256) == 256
                        and c.get("HAS_MIX", 1) == 1 and c.get("WGRAD", 1) == 1][:1]
               for kernel, entries in hst.triton_configs().items()}
    for ptx, cubin in _aot.compile_all(_jobs(configs)):
        assert ptx > 0 and cubin > 0


@pytest.mark.slow
def test_aot_compile_every_config():
    """Every configuration the launchers and the autotuner can choose × sm_80 / sm_90."""
    start = time.perf_counter()
    jobs = _jobs(hst.triton_configs())
    results = _aot.compile_all(jobs)
    assert len(results) == len(jobs) == 2 * (48 + 6 + 24) and all(p > 0 and c > 0 for p, c in results)
    print(f"compiled {len(results)} kernels in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", [
    ((2304,), 12, 256, "mb", True, "c"),    # TinT for OPT-125M
    ((1280,), 12, 64, "mb", True, "t"),     # D 768
    ((8192,), 12, 64, "b", True, "c"),
    ((777,), 12, 256, "m", True, "s"),
    ((3, 100), 5, 48, "mb", False, "c"),
], ids=lambda c: f"N{c[0]}-H{c[1]}-d{c[2]}-{c[3]}" if isinstance(c, tuple) else None)
def test_gpu_2x_rule_and_determinism(case, dtype, floor):
    x, params, gy = _make(*case, dtype, seed=0)
    x, gy = x.cuda(), gy.cuda()
    params = tuple(p.cuda() if p is not None else None for p in params)
    ours = _run(hst.hsim_split_linear_triton, x, params, gy, dtype)
    again = _run(hst.hsim_split_linear_triton, x, params, gy, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))
    exact = _run(hsim_split_linear_ref, x, params, gy, torch.float64)
    low = _run(hsim_split_linear_ref, x, params, gy, dtype)
    for i, (a, pt, ex) in enumerate(zip(ours, low, exact)):
        assert_2x_pytorch(a, pt, ex, floor, f"output {i}")


if __name__ == "__main__":  # the interpreter worker: TRITON_INTERPRET=1 python this_file.py OUT
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _worker(sys.argv[1])

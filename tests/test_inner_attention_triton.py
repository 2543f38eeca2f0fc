"""Triton backend of inner_attention: interpreter runs on CPU, AOT compiles for sm_80 / sm_90, GPU runs.

Triton decides between the interpreter and the compiler when `@triton.jit` runs, i.e. when
tntkernels is imported, and other test files import it first in this process. So the interpreter
checks run this file as a script in a subprocess with TRITON_INTERPRET=1 (`_worker`): it reads the
inputs, writes outputs, lse and gradients (twice, for determinism), and the tests here compare them
against the fp64 oracle with the 2×-PyTorch rule. The AOT tests use the compiler-mode kernels of this
process: `triton.compile` needs no GPU.
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

ia = importlib.import_module("tntkernels.ops.inner_attention")  # the module (tntkernels.ops exports the function)
triton = pytest.importorskip("triton") if __name__ != "__main__" else None

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


def _make_inputs(S, H, m, d, dv, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":
        assert d == dv
        qkv = torch.randn(S, m, 3 * H * d, generator=g, dtype=torch.float64).to(dtype)
        q, k, v = qkv.reshape(S, m, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (S, H, m, d) views
    elif layout == "t":
        q, k = torch.randn(2, S, m, H, d, generator=g, dtype=torch.float64).to(dtype).transpose(2, 3).unbind(0)
        v = torch.randn(S, m, H, dv, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    else:
        q, k = torch.randn(2, S, H, m, d, generator=g, dtype=torch.float64).to(dtype).unbind(0)
        v = torch.randn(S, H, m, dv, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(S, H, m, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _run_triton(q, k, v, dout, scale):
    """out, lse, dq, dk, dv through the public API (custom op + autograd) and the launchers."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ia.inner_attention(q, k, v, scale=scale, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    _, lse = ia.inner_attention_forward(q.detach(), k.detach(), v.detach(), scale)
    return [t.detach() for t in (out, lse, dq, dk, dv)]


def _worker(out_path):
    """Run under TRITON_INTERPRET=1: every case, twice, plus opcheck of the custom ops."""
    results = {}
    for dname, (dtype, _) in DTYPES.items():
        for i, case in enumerate(CASES):
            q, k, v, dout = _make_inputs(*case, dtype, seed=i)
            assert not q.is_contiguous() or case[-1] == "c"
            scale = case[3] ** -0.5
            results[(dname, i)] = (_run_triton(q, k, v, dout, scale), _run_triton(q, k, v, dout, scale))
    q, k, v, dout = _make_inputs(2, 2, 5, 6, 10, "t", torch.float32, seed=99)
    torch.library.opcheck(torch.ops.tntkernels.inner_attention_triton, (q, k, v, 0.3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.tntkernels.inner_attention_triton, (q, k, v, 0.3))
    results["opcheck"] = True
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton_interp") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", TNTKERNELS_BACKEND="")
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return torch.load(path)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"S{c[0]}H{c[1]}m{c[2]}d{c[3]}dv{c[4]}{c[5]}" for c in CASES])
def test_interpreter_forward_grads_lse_2x_rule(interpreted, idx, dname):
    dtype, floor = DTYPES[dname]
    case = CASES[idx]
    (out, lse, dq, dk, dv), _ = interpreted[(dname, idx)]
    q, k, v, dout = _make_inputs(*case, dtype, seed=idx)
    scale = case[3] ** -0.5
    assert out.dtype == dtype and lse.dtype == torch.float32 and dq.dtype == dtype
    # fp64 oracle and PyTorch's own result in the same dtype
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    exact = ia.inner_attention_ref(*leaves64, scale)
    grads64 = torch.autograd.grad(exact, leaves64, dout.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = ia.inner_attention_ref(*leaves, scale)
    grads = torch.autograd.grad(low, leaves, dout)
    assert_2x_pytorch(out, low, exact, floor, "out")
    for name, ours, pt, ex in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, grads64):
        assert_2x_pytorch(ours, pt, ex, floor, name)
    lse_exact = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) * scale, dim=-1)
    assert lse.shape == lse_exact.shape  # fp32 logits and softmax also for fp16 inputs
    assert torch.allclose(lse.double(), lse_exact, rtol=0, atol=1e-5)


def test_interpreter_deterministic_and_opcheck(interpreted):
    assert interpreted["opcheck"]
    for key, runs in interpreted.items():
        if key == "opcheck":
            continue
        first, second = runs
        for a, b in zip(first, second):
            assert torch.equal(a, b), f"{key}: two runs differ"


# ---------------------------------------------------------------------------------------------
# Configurations and AOT compilation (no GPU needed)
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


def _jobs(configs):
    """_aot jobs: both kernels of every configuration for sm_80 and sm_90."""
    jobs = []
    for bm, bd, bdv, pairs, dtype, warps in configs:
        constexprs = dict(BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, PAIRS_PER_PROG=pairs)
        types = {name: _aot.pointer(dtype) for name in ("Q", "K", "V", "Out", "O", "dO", "dQ", "dK", "dV")}
        types.update(Lse="*fp32", scale="fp32")
        jobs += [("tntkernels.ops.inner_attention", kernel, constexprs, types, arch, warps, dtype != torch.float32)
                 for arch in _aot.ARCHS for kernel in ("_inner_attention_fwd_kernel", "_inner_attention_bwd_kernel")]
    return jobs


def test_aot_compile_representative_configs():
    """TNT-S (m 16, d 6) and TNT-B (m 16, d 10) in bf16 (tl.dot's K >= 16 rule bites 16-bit inputs),
    TNT-S in fp32, and the largest tile (m 64, d 64) in bf16, for sm_80 and sm_90."""
    shapes = [((16, 6, 6), torch.bfloat16), ((16, 6, 6), torch.float32), ((16, 10, 10), torch.bfloat16),
              ((64, 64, 64), torch.bfloat16)]
    configs = []
    for (m, d, dv), dtype in shapes:
        bm, bd, bdv, pairs, warps = ia.triton_config(m, d, dv)
        configs.append((bm, bd, bdv, pairs, dtype, warps))
    for ptx, cubin in _aot.compile_all(_jobs(configs)):
        assert ptx > 0 and cubin > 0


@pytest.mark.slow
def test_aot_compile_every_config():
    """Every configuration the launcher can choose: 81 × 2 kernels × sm_80 / sm_90 (about 2.5 min cold
    on 2 cores; runs in CI, deselect with -m 'not slow')."""
    start = time.perf_counter()
    results = _aot.compile_all(_jobs(ia.triton_configs()))
    assert len(results) == 81 * 2 * 2 and all(p > 0 and c > 0 for p, c in results)
    print(f"compiled {len(results)} kernels in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------------------
# Dispatch without the interpreter, and the GPU
# ---------------------------------------------------------------------------------------------

def test_triton_on_cpu_needs_the_interpreter():
    q = torch.randn(2, 2, 4, 6)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ia.inner_attention(q, q, q, backend="triton")


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
@pytest.mark.parametrize("shape", [(75_000, 4, 16, 6, 6), (300, 4, 16, 10, 10), (50, 3, 49, 10, 10),
                                   (40, 2, 9, 12, 20), (30, 2, 64, 64, 64), (20, 3, 1, 6, 6)])
def test_gpu_2x_rule_and_determinism(shape, dtype, floor):
    S, H, m, d, dv = shape
    layout = "qkv" if d == dv else "t"
    q, k, v, dout = (t.cuda() for t in _make_inputs(S, H, m, d, dv, layout, dtype, seed=0))
    scale = d ** -0.5
    out, lse, dq, dk, dv_ = _run_triton(q, k, v, dout, scale)
    again = _run_triton(q, k, v, dout, scale)
    for a, b in zip((out, lse, dq, dk, dv_), again):
        assert torch.equal(a, b)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    exact = ia.inner_attention_ref(*leaves64, scale)
    grads64 = torch.autograd.grad(exact, leaves64, dout.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = ia.inner_attention_ref(*leaves, scale)
    grads = torch.autograd.grad(low, leaves, dout)
    assert_2x_pytorch(out, low, exact, floor, "out")
    for name, ours, pt, ex in zip(("dq", "dk", "dv"), (dq, dk, dv_), grads, grads64):
        assert_2x_pytorch(ours, pt, ex, floor, name)
    lse_exact = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) * scale, dim=-1)
    assert (lse.double() - lse_exact).abs().max().item() <= 1e-4


if __name__ == "__main__":  # the interpreter worker: TRITON_INTERPRET=1 python this_file.py OUT
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _worker(sys.argv[1])

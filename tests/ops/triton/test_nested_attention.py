"""Triton kernels of nested-logit attention (CODA / RealFormer): interpreter on CPU, AOT for sm_80 / sm_90, GPU.

Sessions as tests/ops/triton/test_inner_attention.py: `interpreter` tests run the kernels on CPU under
TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 python -m pytest -m interpreter tests`) and compare out, logits
and every gradient with `nested_attention_ref` in fp64 under the 2×-PyTorch rule (random upstream
gradients enter both out and the logits); `aot` tests compile for sm_80 / sm_90 (`python -m pytest
-m aot tests`); `gpu` tests need a CUDA device.
"""
import importlib
import os
import time

import pytest
import torch

import tntkernels
from helpers import aot
from helpers.inputs import nested_inputs
from helpers.oracle import assert_2x_pytorch
from tntkernels import nested_attention_ref
from tntkernels.ops.reference.nested_attention import LEAKY_SLOPE

nat = importlib.import_module("tntkernels.ops.triton.nested_attention")


def _triton(q, k, v, prev_logits=None, head_mlp=None, noise=None, scale=None):
    """The public op on the Triton backend (checks + dispatch + custom op)."""
    return tntkernels.nested_attention(q, k, v, prev_logits, head_mlp=head_mlp, noise=noise, scale=scale,
                                       backend="triton")


# (B, H, T, d, dv, form, prev, noise, layout, max_programs): form "coda" (head-MLP) or "real"
# (RealFormer); prev: False / True / "mask" / "first" (prev_logits with −inf entries); layout "t" = (B, T, H, ·)
# buffers transposed, "c" = contiguous; max_programs patches the grid cap so programs loop over
# several sequences with B not a multiple of the grid.
CASES = [
    (3, 4, 16, 6, 6, "coda", True, True, "t", None),     # TNT-S inner-like, CODA + noise: one tile
    (2, 3, 9, 10, 10, "coda", True, False, "c", None),   # TNT-B head_dim, T = 9, H = 3
    (2, 3, 9, 10, 6, "real", True, True, "t", None),     # RealFormer, dv != d
    (1, 1, 1, 6, 6, "coda", True, False, "c", None),     # T = 1, H = 1
    (2, 4, 16, 6, 6, "coda", False, True, "c", None),    # first layer: the head-MLP is ignored
    (1, 2, 49, 10, 6, "coda", True, False, "c", None),   # T = 49: 4 × 4 tiles, key-tile kernel
    (3, 2, 20, 12, 20, "real", False, False, "t", None),  # plain attention, 2 × 2 tiles, dS recomputed
    (5, 3, 16, 6, 10, "coda", True, True, "c", 2),       # 2 programs for 5 sequences
    (2, 4, 16, 6, 6, "coda", "mask", False, "c", None),  # −inf in prev_logits
    (3, 2, 17, 6, 6, "real", "mask", True, "t", 2),      # T = 17 (2 tiles), −inf, grid-stride loop
    (1, 9, 12, 8, 8, "coda", True, True, "c", None),     # H = 9: BLOCK_H = 16, BLOCK_F = 64
    (2, 6, 70, 20, 20, "coda", "first", True, "t", 3),   # outer-like: H 6, 5 × 5 tiles, first key tile masked
    (1, 6, 37, 64, 64, "real", False, True, "c", None),  # head_dim 64 (outer level), first layer
]
DTYPES = {"float32": (torch.float32, 1e-5), "float16": (torch.float16, 1e-3)}
# GPU test cases, as CASES (helpers/aot.py REAL_SHAPES holds each, so the AOT set compiles their launches)
GPU_CASES = [
    (2 * 196, 4, 16, 6, 6, "coda", True, True, "t", None),     # TNT-S inner, batch 2
    (64 * 196, 4, 16, 6, 6, "coda", True, False, "t", None),   # TNT-S inner, batch 64 (12,544 sequences)
    (64 * 196, 4, 16, 6, 6, "real", True, True, "t", None),
    (2 * 196, 4, 16, 6, 6, "coda", False, False, "c", None),   # first layer
    (300, 4, 16, 10, 10, "coda", True, False, "c", None),      # TNT-B inner head_dim
    (40, 16, 64, 64, 64, "coda", True, True, "c", None),       # H 16, d 64
    (64, 6, 197, 64, 64, "coda", True, True, "t", None),       # TNT-S outer, batch 64
    (64, 6, 197, 64, 64, "real", True, False, "t", None),
    (4, 10, 577, 64, 64, "coda", "first", False, "c", None),   # TNT-B outer at 384²
    (50, 3, 49, 10, 6, "real", "mask", False, "t", None),
]
_IDS = [f"B{c[0]}H{c[1]}T{c[2]}d{c[3]}dv{c[4]}-{c[5]}-prev{c[6]}-noise{c[7]}-{c[8]}" for c in CASES]


def _make_inputs(B, H, T, d, dv, form, prev, noise, layout, dtype, seed):
    """q, k, v, prev_logits, head_mlp, noise, grad_out, grad_logits (helpers.inputs)."""
    return nested_inputs(B, H, T, d, dv, form=form, prev=prev, noise=noise, layout=layout, dtype=dtype, seed=seed)


def _leaves(q, k, v, prev_logits, head_mlp):
    return [q, k, v] + ([prev_logits] if prev_logits is not None else []) + list(head_mlp or [])


def _run(fn, inputs, dtype, scale):
    """out, logits and the gradients of every leaf (q, k, v, prev_logits?, 6 MLP tensors?) of fn."""
    q, k, v, prev_logits, head_mlp, noise, grad_out, grad_logits = inputs
    leaves = [t.detach().to(dtype).requires_grad_() for t in _leaves(q, k, v, prev_logits, head_mlp)]
    lq, lk, lv = leaves[:3]
    lp = leaves[3] if prev_logits is not None else None
    lm = leaves[3 + (prev_logits is not None):] or None
    out, z = fn(lq, lk, lv, lp, lm, noise.to(dtype) if noise is not None else None, scale)
    grads = torch.autograd.grad([out, z], leaves, [grad_out.to(dtype), grad_logits.to(dtype)], allow_unused=True)
    return [out.detach(), z.detach()] + [g.detach() if g is not None else None for g in grads]


def _grad_names(case):
    names = ["dq", "dk", "dv"] + (["dprev"] if case[6] else [])
    return names + ([f"d{w}" for w in ("w1", "b1", "w2", "b2", "w3", "b3")] if case[5] == "coda" else [])


def _stack_run(head_mlp, dtype, backend):
    """A 12-layer NestedAttention stack (C 24, H 4, T 16, eval): final x, last logits and the gradient
    of every parameter, with logits passed from layer to layer through `backend`."""
    from models.test_nested_models import _stack  # tests/ is on sys.path (conftest.py)

    layers = _stack(12, 24, 4, head_mlp, dtype=dtype, backend=backend)
    x = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    logits = None
    for layer in layers:
        layer.eval()
        a, logits = layer(x, logits)
        x = x + a
    params = [p for layer in layers for p in layer.parameters()]
    grads = torch.autograd.grad(x.square().sum() + 0.1 * logits.square().sum(), params, allow_unused=True)
    return [x.detach(), logits.detach()] + [g for g in grads if g is not None]  # layer 1's head-MLP: unused


def _finite(t, ref):
    """t and ref with the −inf logits (which must agree) replaced by 0, so errors are finite."""
    inf = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(t), inf), "−inf pattern of the logits differs"
    return t.masked_fill(inf, 0.0), ref.masked_fill(inf, 0.0)


def _check_2x_rule(case, inputs, ours, dtype, scale, floor):
    """out, logits and every gradient against the fp64 reference (2×-PyTorch rule); −inf logits must agree."""
    exact = _run(nested_attention_ref, inputs, torch.float64, scale)
    low = _run(nested_attention_ref, inputs, dtype, scale)
    names = ["out", "logits"] + _grad_names(case)
    # The head-MLP is ignored without prev_logits: its tensors get no gradient (None), like the reference.
    n_grads = 3 + bool(case[6]) + (6 if case[5] == "coda" else 0)
    assert len(ours) == len(exact) == 2 + n_grads
    for name, a, pt, ex in zip(names, ours, low, exact):
        if ex is None:
            assert a is None and pt is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        if name == "logits":
            a, ex = _finite(a, ex)
            pt, _ = _finite(pt, exact[1])
        assert_2x_pytorch(a, pt, ex, floor, name)


def _assert_equal_runs(first, second):
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b), "two runs differ"


# ---------------------------------------------------------------------------------------------
# Interpreter (TRITON_INTERPRET=1 session)
# ---------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)), ids=_IDS)
def test_interpreter_outputs_and_grads_2x_rule_deterministic(idx, dname, monkeypatch):
    dtype, floor = DTYPES[dname]
    case = CASES[idx]
    if case[9]:  # patch the grid cap: programs loop over several sequences (grid-stride)
        monkeypatch.setattr(nat, "_MAX_PROGRAMS", case[9])
    inputs = _make_inputs(*case[:9], dtype, seed=idx)
    scale = case[3] ** -0.5
    ours = _run(_triton, inputs, dtype, scale)
    _assert_equal_runs(ours, _run(_triton, inputs, dtype, scale))
    _check_2x_rule(case, inputs, ours, dtype, scale, floor)


@pytest.mark.interpreter
@pytest.mark.parametrize("i", (0, 2, 4, 5, 6))  # CODA with prev and noise, RealFormer, first layer; long CODA / plain
def test_interpreter_opcheck(i):
    op = torch.ops.tntkernels.nested_attention_triton
    bwd = torch.ops.tntkernels.nested_attention_triton_backward
    q, k, v, prev, mlp, noise, gout, gz = _make_inputs(*CASES[i][:9], torch.float32, seed=50 + i)
    q, k, v = (t.contiguous() for t in (q, k, v))
    args = (q, k, v, prev, list(mlp or []), noise, 0.4)
    torch.library.opcheck(op, args)
    out, _, lse = op(*args)
    torch.library.opcheck(bwd, (gout, gz, q, k, v, prev, list(mlp or []), noise, out, lse, 0.4))
    torch.library.opcheck(bwd, (gout, None, q, k, v, prev, list(mlp or []), noise, out, lse, 0.4))
    leaves = [t.requires_grad_() for t in _leaves(q, k, v, prev, mlp)]
    assert leaves
    torch.library.opcheck(op, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("head_mlp", [True, False], ids=["coda", "realformer"])
def test_interpreter_twelve_layer_stack(head_mlp):
    """Logits carried through 12 layers by the Triton kernels: output, last logits and every
    parameter gradient (the logits' gradient crosses every layer) vs the reference, 2× rule."""
    ours = _stack_run(head_mlp, torch.float32, "triton")
    exact = _stack_run(head_mlp, torch.float64, "reference")
    low = _stack_run(head_mlp, torch.float32, "reference")
    assert len(ours) == len(exact) == 2 + 12 * 4 + (11 * 6 if head_mlp else 0)
    for i, (a, pt, ex) in enumerate(zip(ours, low, exact)):
        assert_2x_pytorch(a, pt, ex, 1e-5, f"stack output {i}")


_OUT_OF_RANGE = (((1, 2, 1025, 6), (1, 2, 1025, 6), "T <= 1024"), ((1, 17, 4, 6), (1, 17, 4, 6), "H <= 16"),
                 ((1, 2, 4, 65), (1, 2, 4, 65), "d, dv <= 64"), ((1, 2, 4, 6), (1, 2, 4, 65), "dv <= 64"))


def test_unsupported_shapes_raise():
    """The launchers check the range first (before any triton call), with the registry's message."""
    for q_shape, v_shape, what in _OUT_OF_RANGE:
        q, v = torch.randn(*q_shape), torch.randn(*v_shape)
        with pytest.raises(ValueError, match=f"nested_attention: the 'triton' backend does not support .*{what}"):
            nat.nested_attention_forward(q, q, v, None, [], None, 1.0)
    x = torch.randn(1, 2, 4, 6).double()
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        nat.nested_attention_forward(x, x, x, None, [], None, 1.0)
    q = torch.randn(1, 2, 4, 6)
    with pytest.raises(ValueError, match="head_mlp"):  # the public op's input check, before dispatch
        _triton(q, q, q, torch.randn(1, 2, 4, 4), head_mlp=[torch.randn(8, 2)])


@pytest.mark.interpreter
def test_interpreter_unsupported_shapes_raise_through_the_registry():
    for q_shape, v_shape, what in _OUT_OF_RANGE:
        q, v = torch.randn(*q_shape), torch.randn(*v_shape)
        with pytest.raises(ValueError, match=f"nested_attention: the 'triton' backend does not support .*{what}"):
            _triton(q, q, v)
    x = torch.randn(1, 2, 4, 6).double()
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        _triton(x, x, x)


@pytest.mark.triton
def test_triton_on_cpu_needs_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    q = torch.randn(2, 2, 4, 6)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _triton(q, q, q)


# ---------------------------------------------------------------------------------------------
# Configurations and AOT compilation (no GPU needed)
# ---------------------------------------------------------------------------------------------

def test_configs_cover_every_launch():
    configs = nat.triton_configs()
    assert len(configs) == len(set(configs)) == 45
    for T in (1, 16, 17, 197, 577):
        for d, dv in ((1, 1), (6, 6), (10, 6), (17, 40), (64, 64)):
            for H in range(1, 17):
                for has_mlp in (False, True):
                    bh, bf, bd, warps = nat.triton_config(T, d, dv, H, has_mlp)
                    assert bd >= max(16, d, dv) and bh >= H
                    assert (bf >= max(16, 4 * H)) if has_mlp else bf == 0
                    for dtype in (torch.float32, torch.float16, torch.bfloat16):
                        assert (bh, bf, bd, dtype, warps) in configs


@pytest.mark.triton
def test_aot_default_set_covers_the_gpu_tests():
    """The default AOT set holds what the GPU test and Nested-TNT-S launch (the key-tile kernel only
    for T > 16), and nothing the launchers cannot choose."""
    shapes = [(*s[:6], bool(s[6]), *s[7:]) for s in aot.REAL_SHAPES["nested_attention"].values()]
    for case in GPU_CASES:
        assert (*case[:6], bool(case[6]), *case[7:9]) in shapes, case
    jobs = aot.default_jobs("nested_attention")
    assert {j.key for j in jobs} <= {j.key for j in aot.every_job("nested_attention")}
    assert all(dict(j.constexprs)["SLOPE"] == LEAKY_SLOPE for j in jobs)
    inner_coda = [j for j in jobs if dict(j.constexprs)["BLOCK_F"] == 16]
    assert inner_coda and all(j.kernel != "_nested_attention_bwd_kv_kernel" for j in inner_coda)  # T = 16: one tile


@pytest.mark.aot
def test_aot_compile_dispatched_configs():
    """The kernels every real shape launches (Nested-TNT-S inner T 16, H 4, d 6 and outer T 197, H 6,
    d 64, CODA and layer 1; the GPU test's shapes) in fp32 / fp16 / bf16, for sm_80 and sm_90: PTX
    for the architecture, tensor-core mma for 16-bit inputs (resources: test_resources.py)."""
    jobs = list(aot.default_jobs("nested_attention"))
    for job, res in zip(jobs, aot.compile_all(jobs)):  # a kernel over the shared-memory limit stops
        assert res.built or aot.over_limit(job, res), job.id  # at the LLVM IR (test_resources.py)


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.skipif(not aot.sweep_requested(), reason="every configuration: TNTKERNELS_AOT=all")
def test_aot_compile_every_config():
    """Every configuration the launcher can choose: 45 × 3 kernels × sm_80 / sm_90 = 270 compilations."""
    start = time.perf_counter()
    jobs = aot.every_job("nested_attention")
    results = aot.compile_all(jobs)
    assert len(results) == len(jobs) == 45 * 3 * 2
    aot.report_sweep(jobs, results, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}T{c[2]}d{c[3]}dv{c[4]}-{c[5]}" if isinstance(c, tuple) else None)
def test_gpu_2x_rule_and_determinism(case, dtype, floor):
    inputs = [t.cuda() if t is not None and not isinstance(t, list) else
              ([w.cuda() for w in t] if isinstance(t, list) else None)
              for t in _make_inputs(*case[:9], dtype, seed=0)]
    scale = case[3] ** -0.5
    why = nat.unsupported(inputs[0].to(dtype), inputs[2].to(dtype), bool(case[6]) and case[5] == "coda")
    if why is not None:  # a configuration over this device's shared memory (nat.SHARED_KB): refused, clearly
        assert "shared memory" in why, why
        with pytest.raises(ValueError, match="shared memory"):
            _run(_triton, inputs, dtype, scale)
        return
    ours = _run(_triton, inputs, dtype, scale)
    _assert_equal_runs(ours, _run(_triton, inputs, dtype, scale))
    exact = _run(nested_attention_ref, inputs, torch.float64, scale)
    low = _run(nested_attention_ref, inputs, dtype, scale)
    for name, a, pt, ex in zip(["out", "logits"] + _grad_names(case), ours, low, exact):
        if ex is None:
            assert a is None, name
            continue
        if name == "logits":
            a, ex = _finite(a, ex)
            pt, _ = _finite(pt, exact[1])
        assert_2x_pytorch(a, pt, ex, floor, name)

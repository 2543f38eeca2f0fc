"""Triton kernels of nested-logit attention (CODA / RealFormer): interpreter on CPU, AOT for sm_80 / sm_90, GPU.

Triton decides between the interpreter and the compiler when `@triton.jit` runs (at import), so the
interpreter checks run this file as a script in a subprocess with TRITON_INTERPRET=1 (`_worker`):
it writes out, logits and every gradient (twice, for determinism) and the tests here compare them
with `nested_attention_ref` in fp64 under the 2×-PyTorch rule. Random upstream gradients enter both
out and the logits. The AOT tests compile the kernels of this process with `triton.compile` (no GPU).
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

nat = importlib.import_module("tntkernels.ops.nested_attention_triton")
from tntkernels.ops.nested_attention import nested_attention_ref  # noqa: E402

triton = pytest.importorskip("triton") if __name__ != "__main__" else None

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
_IDS = [f"B{c[0]}H{c[1]}T{c[2]}d{c[3]}dv{c[4]}-{c[5]}-prev{c[6]}-noise{c[7]}-{c[8]}" for c in CASES]


def _make_inputs(B, H, T, d, dv, form, prev, noise, layout, dtype, seed):
    """q, k, v, prev_logits, head_mlp, noise, grad_out, grad_logits (prev / mlp / noise may be None)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    if layout == "t":
        q, k = randn(2, B, T, H, d).transpose(2, 3).unbind(0)
        v = randn(B, T, H, dv).transpose(1, 2)
    else:
        q, k = randn(2, B, H, T, d).unbind(0)
        v = randn(B, H, T, dv)
    prev_logits = randn(B, H, T, T) if prev else None
    if prev in ("mask", "first"):  # keys masked out in every head, never a whole row
        if prev == "mask":  # random keys
            drop = torch.rand(B, 1, T, T, generator=g) < 0.3
            drop[..., 0] = False
        else:  # the whole first key tile (16 keys): the online softmax starts from −inf rows
            drop = torch.zeros(B, 1, T, T, dtype=torch.bool)
            drop[..., :16] = True
        prev_logits = prev_logits.masked_fill(drop, float("-inf"))
    head_mlp = None
    if form == "coda":
        F = 4 * H
        head_mlp = [randn(F, H, std=H ** -0.5), randn(F, std=0.1), randn(F, F, std=F ** -0.5), randn(F, std=0.1),
                    randn(H, F, std=F ** -0.5), randn(H, std=0.1)]
    noise_t = randn(B, H, T, T) if noise else None
    grad_out = randn(B, H, T, dv)
    grad_logits = randn(B, H, T, T, std=0.5)
    return q, k, v, prev_logits, head_mlp, noise_t, grad_out, grad_logits


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


def _worker(out_path):
    """Run under TRITON_INTERPRET=1: every case in every dtype, twice, plus opcheck of the custom ops."""
    results = {}
    cap = nat._MAX_PROGRAMS
    for dname, (dtype, _) in DTYPES.items():
        for i, case in enumerate(CASES):
            inputs = _make_inputs(*case[:9], dtype, seed=i)
            scale = case[3] ** -0.5
            nat._MAX_PROGRAMS = case[9] or cap
            try:
                results[(dname, i)] = tuple(_run(nat.nested_attention_triton, inputs, dtype, scale) for _ in range(2))
            finally:
                nat._MAX_PROGRAMS = cap
    op = torch.ops.tntkernels.nested_attention_triton
    bwd = torch.ops.tntkernels.nested_attention_triton_backward
    for i in (0, 2, 4, 5, 6):  # CODA with prev and noise, RealFormer, first layer; long CODA / plain
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
    results["opcheck"] = True
    for head_mlp in (True, False):
        results[("stack", head_mlp)] = _stack_run(head_mlp, torch.float32, "triton")
    torch.save(results, out_path)


def _stack_run(head_mlp, dtype, backend):
    """A 12-layer NestedAttention stack (C 24, H 4, T 16, eval): final x, last logits and the gradient
    of every parameter, with logits passed from layer to layer through `backend`."""
    from test_nested_models import _stack

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


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("nested_triton_interp") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", TNTKERNELS_BACKEND="")
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return torch.load(path)


def _finite(t, ref):
    """t and ref with the −inf logits (which must agree) replaced by 0, so errors are finite."""
    inf = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(t), inf), "−inf pattern of the logits differs"
    return t.masked_fill(inf, 0.0), ref.masked_fill(inf, 0.0)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)), ids=_IDS)
def test_interpreter_outputs_and_grads_2x_rule(interpreted, idx, dname):
    dtype, floor = DTYPES[dname]
    case = CASES[idx]
    ours, _ = interpreted[(dname, idx)]
    inputs = _make_inputs(*case[:9], dtype, seed=idx)
    scale = case[3] ** -0.5
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


@pytest.mark.parametrize("head_mlp", [True, False], ids=["coda", "realformer"])
def test_interpreter_twelve_layer_stack(interpreted, head_mlp):
    """Logits carried through 12 layers by the Triton kernels: output, last logits and every
    parameter gradient (the logits' gradient crosses every layer) vs the reference, 2× rule."""
    ours = interpreted[("stack", head_mlp)]
    exact = _stack_run(head_mlp, torch.float64, "reference")
    low = _stack_run(head_mlp, torch.float32, "reference")
    assert len(ours) == len(exact) == 2 + 12 * 4 + (11 * 6 if head_mlp else 0)
    for i, (a, pt, ex) in enumerate(zip(ours, low, exact)):
        assert_2x_pytorch(a, pt, ex, 1e-5, f"stack output {i}")


def test_interpreter_deterministic_and_opcheck(interpreted):
    assert interpreted["opcheck"]
    for key, runs in interpreted.items():
        if key == "opcheck" or key[0] == "stack":
            continue
        first, second = runs
        for a, b in zip(first, second):
            assert (a is None and b is None) or torch.equal(a, b), f"{key}: two runs differ"


def test_unsupported_shapes_raise():
    q = torch.randn(1, 2, 4, 6)
    for shape, what in (((1, 2, 1025, 6), "T <= 1024"), ((1, 17, 4, 6), "H <= 16"), ((1, 2, 4, 65), "d, dv <= 64")):
        x = torch.randn(*shape)
        with pytest.raises(ValueError, match=what):
            nat.nested_attention_triton(x, x, x)
    with pytest.raises(ValueError, match="dv <= 64"):
        nat.nested_attention_triton(q, q, torch.randn(1, 2, 4, 65))
    x = q.double()
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        nat.nested_attention_triton(x, x, x)
    with pytest.raises(ValueError, match="head_mlp"):
        nat.nested_attention_triton(q, q, q, torch.randn(1, 2, 4, 4), head_mlp=[torch.randn(8, 2)])


def test_triton_on_cpu_needs_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    q = torch.randn(2, 2, 4, 6)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        nat.nested_attention_triton(q, q, q)


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


def _jobs(configs):
    """_aot jobs: the three kernels of every configuration for sm_80 and sm_90."""
    jobs = []
    for bh, bf, bd, dtype, warps in configs:
        constexprs = dict(BLOCK_H=bh, BLOCK_I=nat.BLOCK_I, BLOCK_J=nat.BLOCK_J, BLOCK_D=bd, BLOCK_F=bf,
                          SLOPE=nat.LEAKY_SLOPE)
        types = {name: _aot.pointer(dtype) for name in ("Q", "K", "V", "Prev", "Noise", "W1", "B1", "W2", "B2", "W3",
                                                         "B3", "Out", "Z", "GO", "GZ", "dQ", "dK", "dV", "dPrev")}
        types.update({name: "*fp32" for name in ("Lse", "Delta", "dW1", "dB1", "dW2", "dB2", "dW3", "dB3")})
        types["scale"] = "fp32"
        jobs += [("tntkernels.ops.nested_attention_triton", kernel, constexprs, types, arch, warps,
                  dtype != torch.float32)
                 for arch in _aot.ARCHS
                 for kernel in ("_nested_fwd_kernel", "_nested_bwd_q_kernel", "_nested_bwd_kv_kernel")]
    return jobs


def test_aot_compile_representative_configs():
    """TNT-S inner (T 16, d 6, H 4) CODA in bf16 and outer (T 197, d 64, H 6) RealFormer in fp32, for
    sm_80 and sm_90."""
    configs = []
    for (T, d, H, mlp), dtype in (((16, 6, 4, True), torch.bfloat16), ((197, 64, 6, False), torch.float32)):
        bh, bf, bd, warps = nat.triton_config(T, d, d, H, mlp)
        configs.append((bh, bf, bd, dtype, warps))
    for ptx, cubin in _aot.compile_all(_jobs(configs)):
        assert ptx > 0 and cubin > 0


@pytest.mark.slow
def test_aot_compile_every_config():
    """Every configuration the launcher can choose: 45 × 3 kernels × sm_80 / sm_90 = 270 compilations."""
    start = time.perf_counter()
    results = _aot.compile_all(_jobs(nat.triton_configs()))
    assert len(results) == 45 * 3 * 2 and all(p > 0 and c > 0 for p, c in results)
    print(f"compiled {len(results)} kernels in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", [
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
], ids=lambda c: f"B{c[0]}H{c[1]}T{c[2]}d{c[3]}dv{c[4]}-{c[5]}" if isinstance(c, tuple) else None)
def test_gpu_2x_rule_and_determinism(case, dtype, floor):
    inputs = [t.cuda() if t is not None and not isinstance(t, list) else
              ([w.cuda() for w in t] if isinstance(t, list) else None)
              for t in _make_inputs(*case[:9], dtype, seed=0)]
    scale = case[3] ** -0.5
    ours = _run(nat.nested_attention_triton, inputs, dtype, scale)
    again = _run(nat.nested_attention_triton, inputs, dtype, scale)
    for a, b in zip(ours, again):
        assert (a is None and b is None) or torch.equal(a, b)
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


if __name__ == "__main__":  # the interpreter worker: TRITON_INTERPRET=1 python this_file.py OUT
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _worker(sys.argv[1])

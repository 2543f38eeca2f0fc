"""The fused TNT inner sub-block: reference vs timm, Triton kernels under the interpreter (2×-PyTorch
rule, forward and every gradient), determinism, TNTBlock / RTNT using it, AOT compilation, errors.

Sessions as tests/ops/triton/test_inner_attention.py: `interpreter` tests run under TRITON_INTERPRET=1
(`TRITON_INTERPRET=1 python -m pytest -m interpreter tests`), `aot` tests compile for sm_80 / sm_90
(`python -m pytest -m aot tests`), `gpu` tests need a CUDA device.
"""
import importlib
import os
import time

import pytest
import torch
import torch.nn as nn

import tntkernels
from helpers import aot
from helpers.inputs import inner_block_inputs
from helpers.oracle import assert_2x_pytorch
from tntkernels.ops.reference import inner_block as ibr

ibt = importlib.import_module("tntkernels.ops.triton.inner_block")  # kernels, launchers, custom ops
ibo = importlib.import_module("tntkernels.ops.inner_block")  # the public op's module (fused_available)

# (S, m, C, H, qkv_bias, drop_path, layout). S = 13 with m = 16: 4 forward groups, 7 backward groups
# over 3 programs, the last group short. "t": x is a transposed (m, S, C) buffer (strided rows).
CASES = [
    (13, 16, 24, 4, False, False, "c"),  # TNT-S inner: C 24, 4 heads of 6
    (5, 16, 40, 4, True, True, "t"),     # TNT-B inner: C 40, head_dim 10, qkv bias, drop-path
    (3, 9, 20, 2, False, True, "c"),     # m 9, head_dim 10
    (2, 49, 12, 3, True, False, "t"),    # m 49 (BLOCK_R 64, one sentence per group)
    (9, 4, 8, 1, False, True, "c"),      # RTNT letters: m 4, C 8, one head
    (3, 1, 6, 2, False, False, "c"),     # m 1
]
# GPU test cases (helpers/aot.py REAL_SHAPES holds each, so the AOT set compiles their launches)
GPU_CASES = [(12_544, 16, 24, 4, False, True, "t"), (1_000, 16, 40, 4, True, False, "c"),
             (300, 49, 20, 2, False, True, "c"), (2_000, 4, 8, 1, False, False, "t")]
# (x dtype, compute dtype, floor)
DTYPES = {"float32": (torch.float32, torch.float32, 1e-5), "float16": (torch.float16, torch.float16, 1e-3),
          "f32+f16": (torch.float32, torch.float16, 1e-3)}


def make_inputs(S, m, C, H, qkv_bias, drop_path, layout, dtype, seed=0, hidden=None):
    """x, params, dy, drop-path scales (helpers.inputs)."""
    return inner_block_inputs(S, m, C, H, hidden=hidden, qkv_bias=qkv_bias, drop_path=drop_path, layout=layout,
                              dtype=dtype, seed=seed)


def run_block(x, params, dy, scales, H, backend, compute=None):
    """y and the gradients (x first, then params in their order) through the public `inner_block`."""
    leaves = [x.detach().clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params.values()]
    named = dict(zip(params, leaves[1:]))
    y = tntkernels.inner_block(leaves[0], named, num_heads=H, drop_path_scales=scales, compute_dtype=compute,
                               backend=backend)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return [y.detach()] + [g.detach() for g in grads]


def _tnt_blocks(C, m, H, seed):
    from tntkernels.nn import TNTBlock
    torch.manual_seed(seed)
    fused = TNTBlock(C, 48, m, num_heads_in=H, num_heads_out=4, drop_path=0.2, backend="triton")
    plain = TNTBlock(C, 48, m, num_heads_in=H, num_heads_out=4, drop_path=0.2, backend="reference")
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.2)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _block_outputs(block, words, sentences, seed):
    torch.manual_seed(seed)
    words, sentences = words.clone().requires_grad_(), sentences.clone().requires_grad_()
    w, s = block(words, sentences)
    (w.square().sum() + s.square().sum()).backward()
    return [w.detach(), s.detach(), words.grad, sentences.grad] + [p.grad.clone() for p in block.parameters()]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the launches of the forward and backward Triton launchers (through the custom ops)."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = ibt.inner_block_forward, ibt.inner_block_backward

    def counting_fwd(*a):
        calls["fwd"] += 1
        return fwd(*a)

    def counting_bwd(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(ibt, "inner_block_forward", counting_fwd)
    monkeypatch.setattr(ibt, "inner_block_backward", counting_bwd)
    return calls


def _oracles(case, dtype, compute, seed):
    """(fp64 exact, PyTorch in the same dtypes) outputs and gradients for one case."""
    x, params, dy, scales = make_inputs(*case, dtype, seed=seed)
    H = case[3]
    exact = run_block(x.double(), {n: p.double() for n, p in params.items()}, dy.double(), scales, H, "reference")
    pytorch = run_block(x, params, dy, scales, H, "reference", compute)
    return exact, pytorch, ["y", "dx"] + list(params)


# ---------------------------------------------------------------------------------------------
# Interpreter (TRITON_INTERPRET=1 session)
# ---------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("idx", range(len(CASES)),
                         ids=[f"S{c[0]}m{c[1]}C{c[2]}H{c[3]}{'bias' if c[4] else ''}{'dp' if c[5] else ''}{c[6]}"
                              for c in CASES])
def test_interpreter_forward_and_all_grads_2x_rule_deterministic(idx, dname, kernel_calls):
    dtype, compute, floor = DTYPES[dname]
    case = CASES[idx]
    x, params, dy, scales = make_inputs(*case, dtype, seed=idx)
    ours = run_block(x, params, dy, scales, case[3], "triton", compute)
    again = run_block(x, params, dy, scales, case[3], "triton", compute)
    assert kernel_calls == {"fwd": 2, "bwd": 2}  # the fused kernels, not the reference
    for a, b in zip(ours, again):
        assert torch.equal(a, b), "two runs differ"
    exact, pytorch, names = _oracles(case, dtype, compute, idx)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, a, p, e in zip(names, ours, pytorch, exact):
        assert_2x_pytorch(a, p, e, floor, name)


@pytest.mark.interpreter
def test_interpreter_opcheck():
    """The custom op, no grad and with grad."""
    x, params, _, _ = make_inputs(2, 4, 8, 2, True, False, "t", torch.float32, seed=7)
    plist = [params[n].contiguous() for n in ibr.PARAM_NAMES]  # float32: LayerNorm ones must be
    ones = torch.ones(2)
    torch.library.opcheck(torch.ops.tntkernels.inner_block_triton, (x, plist, ones, ones * 0.5, 2, 1e-5, 1e-6))
    plist = [p.requires_grad_() for p in plist]
    torch.library.opcheck(torch.ops.tntkernels.inner_block_triton,
                          (x.requires_grad_(), plist, ones, ones * 0.5, 2, 1e-5, 1e-6))


@pytest.mark.interpreter
def test_interpreter_double_backward_matches_reference():
    """double backward (create_graph=True) differentiates the reference: compare with it."""
    x, params, dy, scales = make_inputs(3, 4, 8, 2, True, True, "c", torch.float32, seed=5)
    second = []
    for backend in ("triton", "reference"):
        leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params.values()]
        y = tntkernels.inner_block(leaves[0], dict(zip(params, leaves[1:])), num_heads=2, drop_path_scales=scales,
                                   backend=backend)
        (gx,) = torch.autograd.grad(y, leaves[0], dy, create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), leaves, allow_unused=True))  # fc2.bias: unused
    fused, ref = second
    assert sum(a is not None and a.abs().max() > 0 for a in fused) >= len(fused) - 1
    for i, (a, b) in enumerate(zip(fused, ref)):
        assert (a is None) == (b is None), f"leaf {i}"
        assert a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"leaf {i}"


@pytest.mark.interpreter
def test_tnt_block_uses_the_fused_kernel(kernel_calls):
    """TNTBlock: fused inner sub-block vs the module path, eval and train mode (drop-path draws alike)."""
    words, sentences = torch.randn(2 * 4, 16, 24), torch.randn(2, 5, 48)
    fused, plain = _tnt_blocks(24, 16, 4, seed=0)
    results = {}
    for mode, seed in (("eval", 1), ("train", 2)):
        for block in (fused, plain):
            block.train(mode == "train")
        results[mode] = (_block_outputs(fused, words, sentences, seed), _block_outputs(plain, words, sentences, seed))
    assert (kernel_calls["fwd"], kernel_calls["bwd"]) == (2, 2)  # eval and train forward, and their backward
    for mode, (fused_out, plain_out) in results.items():
        for i, (a, b) in enumerate(zip(fused_out, plain_out)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{mode} output/grad {i}: {(a - b).abs().max():.2e}"
    # drop-path is active in train mode: outputs differ from eval
    assert not torch.allclose(results["eval"][0][0], results["train"][0][0])


@pytest.mark.interpreter
def test_rtnt_uses_the_fused_kernel(kernel_calls):
    """RTNT: its letter layers and word level take the fused path too."""
    from tntkernels.models import create_model
    torch.manual_seed(0)
    rtnt = create_model("rtnt_n_patch8_32", num_classes=10, backend="triton").eval()
    images = torch.randn(2, 1, 32, 32)
    logits = rtnt(images)
    assert kernel_calls["fwd"] >= 2  # letter layers and word levels
    ref = create_model("rtnt_n_patch8_32", num_classes=10, backend="reference").eval()
    ref.load_state_dict(rtnt.state_dict())
    assert torch.allclose(logits.detach(), ref(images).detach(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Reference, dispatch and errors on CPU (no interpreter)
# ---------------------------------------------------------------------------------------------

def test_reference_equals_timm_block_inner_half():
    tnt = pytest.importorskip("timm.models.tnt")
    torch.manual_seed(0)
    block = tnt.Block(dim=24, dim_out=48, num_pixel=16, num_heads_in=4, num_heads_out=4).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(6, 16, 24, dtype=torch.float64)
    expected = x + block.attn_in(block.norm_in(x))
    expected = expected + block.mlp_in(block.norm_mlp_in(expected))
    params = {n: p for n, p in block.named_parameters() if n in ibr.PARAM_NAMES}
    assert set(params) == set(ibr.PARAM_NAMES) - set(ibr.OPTIONAL_PARAMS)
    ours = tntkernels.inner_block_ref(x, params, num_heads=4, eps=(block.norm_in.eps, block.norm_mlp_in.eps))
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12)


def test_reference_drop_path_scales_scale_each_branch():
    x, params, _, _ = make_inputs(4, 9, 20, 2, True, False, "c", torch.float64)
    zero, one = torch.zeros(4), torch.ones(4)
    assert torch.equal(tntkernels.inner_block_ref(x, params, num_heads=2, drop_path_scales=(zero, zero)), x)
    full = tntkernels.inner_block_ref(x, params, num_heads=2)
    assert torch.allclose(tntkernels.inner_block_ref(x, params, num_heads=2, drop_path_scales=(one, one)), full)
    mixed = tntkernels.inner_block_ref(x, params, num_heads=2, drop_path_scales=(one, zero))
    assert not torch.allclose(mixed, full) and not torch.allclose(mixed, x)


def test_public_reference_backend_and_compute_dtype():
    x, params, dy, _ = make_inputs(3, 16, 24, 4, False, False, "c", torch.float32)
    y = tntkernels.inner_block(x, params, num_heads=4)  # CPU default: the reference
    assert torch.equal(y, tntkernels.inner_block_ref(x, params, num_heads=4))
    y16 = tntkernels.inner_block(x, params, num_heads=4, compute_dtype=torch.bfloat16)
    assert y16.dtype == torch.float32 and 0 < (y16 - y).abs().max() < 0.1


def test_tnt_block_on_cpu_runs_the_modules():
    """backend None / "reference" on CPU: the fused kernel does not apply, TNTBlock runs its modules."""
    from tntkernels.nn import TNTBlock
    from tntkernels.nn.block import fused_inner_sublayer
    block = TNTBlock(24, 48, 16, num_heads_in=4, num_heads_out=4).eval()
    x = torch.randn(4, 16, 24)
    args = (block.norm_in, block.attn_in, block.norm_mlp_in, block.mlp_in, block.drop_path)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert fused_inner_sublayer(x, *args) is None
        block.attn_in.backend = "triton"
        assert fused_inner_sublayer(x, *args) is None  # triton on CPU without the interpreter
        block.attn_in.backend = None
    block.mlp_in.act = nn.GELU(approximate="tanh")
    block.attn_in.backend = "triton"
    assert fused_inner_sublayer(x, *args[:3], block.mlp_in, block.drop_path) is None  # not the exact GELU


@pytest.mark.parametrize("change,match", [
    (lambda x, p: (x[0], p, 4), "must be 3-D"),
    (lambda x, p: (x, p, 5), "num_heads must be a positive int dividing C"),
    (lambda x, p: (x, {k: v for k, v in p.items() if k != "attn_in.proj.weight"}, 4), "must hold 'attn_in.proj.weight'"),
    (lambda x, p: (x, {**p, "attn_in.v.weight": p["attn_in.v.weight"][:, :-1]}, 4), r"must have shape \(24, 24\)"),
    (lambda x, p: (x.int(), p, 4), "float16, bfloat16, float32 or float64"),
])
def test_bad_input_raises_value_error(change, match):
    x, params, _, _ = make_inputs(3, 16, 24, 4, False, False, "c", torch.float32)
    x, params, H = change(x, params)
    with pytest.raises(ValueError, match=match):
        tntkernels.inner_block(x, params, num_heads=H)


def test_bad_eps_scales_and_backends():
    x, params, _, _ = make_inputs(3, 16, 24, 4, False, False, "c", torch.float32)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        tntkernels.inner_block(x, params, num_heads=4, eps=0.0)
    with pytest.raises(ValueError, match=r"s_attn must be \(3,\)"):
        tntkernels.inner_block(x, params, num_heads=4, drop_path_scales=(torch.ones(2), torch.ones(3)))
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        tntkernels.inner_block(x, params, num_heads=4, backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            tntkernels.inner_block(x, params, num_heads=4, backend="triton")


def test_fused_unsupported_names_the_limit():
    x = torch.randn(2, 16, 24)
    assert ibt.unsupported(x, 24, 96) is None
    assert "C = 80" in ibt.unsupported(torch.randn(2, 16, 80), 80, 320)
    assert "hidden width 200" in ibt.unsupported(x, 24, 200)
    assert "float64" in ibt.unsupported(x.double(), 24, 96)
    assert "m = 65" in ibt.unsupported(torch.randn(2, 65, 24), 24, 96)
    assert not ibo.fused_available(x, 24, 96, 4, "reference")
    assert not ibo.fused_available(x, 24, 96, 4, "cuda")  # not implemented for this op: False, no raise


# ---------------------------------------------------------------------------------------------
# Configurations and AOT compilation (no GPU needed)
# ---------------------------------------------------------------------------------------------

def test_configs_cover_every_launch():
    configs = ibt.triton_configs()
    assert len(configs) == len(set(configs))
    for m in range(1, 65):
        for C in range(1, 65):
            for H in (h for h in range(1, C + 1) if C % h == 0):
                tile = ibt.triton_config(m, C, C // H)
                br_fwd, br_bwd, bc, bd, bf, _ = tile
                assert br_fwd >= m and br_bwd >= m and bc >= C and bd >= C // H and bf >= 4 * C
                for xd, cd in ibt.DTYPE_PAIRS:
                    assert (*tile, xd, cd) in configs


@pytest.mark.triton
def test_aot_default_set_covers_the_gpu_tests():
    """The default AOT set holds what the GPU test and the model shapes launch (fp32 / fp16 / bf16 and
    bf16 autocast, as the GPU test), and nothing the launchers cannot choose."""
    shapes = aot.REAL_SHAPES["inner_block"].values()
    for case in GPU_CASES:
        assert case in shapes, case
    jobs = aot.default_jobs("inner_block")
    assert {j.key for j in jobs} <= {j.key for j in aot.every_job("inner_block")}
    assert {j.dtype for j in jobs} == {"fp32", "fp16", "bf16", "fp32+bf16"}


@pytest.mark.aot
def test_aot_compile_dispatched_configs():
    """Both kernels of every tile the real shapes launch (TNT-S / TNT-B inner, RTNT letters and words,
    the GPU test's shapes) in fp32 / fp16 / bf16 and under bf16 autocast, for sm_80 and sm_90: PTX for
    the architecture, tensor-core mma for 16-bit compute (resources: test_resources.py)."""
    jobs = list(aot.default_jobs("inner_block"))
    for job, res in zip(jobs, aot.compile_all(jobs)):  # a kernel over the shared-memory limit stops
        assert res.built or aot.over_limit(job, res), job.id  # at the LLVM IR (test_resources.py)


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.skipif(not aot.sweep_requested(), reason="every configuration: TNTKERNELS_AOT=all")
def test_aot_compile_every_config():
    """Every configuration the launchers can choose × 2 kernels × sm_80 / sm_90 (distinct compilations:
    the forward does not depend on BLOCK_R of the backward and vice versa)."""
    start = time.perf_counter()
    jobs = aot.every_job("inner_block")
    results = aot.compile_all(jobs)
    assert len(results) == len(jobs)
    aot.report_sweep(jobs, results, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, 1e-5), (torch.float16, torch.float16, 1e-3),
                                    (torch.bfloat16, torch.bfloat16, 1e-2), (torch.float32, torch.bfloat16, 1e-2)],
                         ids=["fp32", "fp16", "bf16", "fp32+bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=["tnt_s_b64", "tnt_b", "m49", "rtnt_letters"])
def test_gpu_2x_rule_and_determinism(case, dtypes):
    dtype, compute, floor = dtypes
    x, params, dy, scales = make_inputs(*case, dtype, seed=0)
    x, dy = x.cuda(), dy.cuda()
    params = {n: p.cuda() for n, p in params.items()}
    scales = None if scales is None else tuple(s.cuda() for s in scales)
    H = case[3]
    ours = run_block(x, params, dy, scales, H, "triton", compute)
    again = run_block(x, params, dy, scales, H, "triton", compute)
    for a, b in zip(ours, again):
        assert torch.equal(a, b)
    exact = run_block(x.double(), {n: p.double() for n, p in params.items()}, dy.double(), scales, H, "reference")
    pytorch = run_block(x, params, dy, scales, H, "reference", compute)
    for name, a, p, e in zip(["y", "dx"] + list(params), ours, pytorch, exact):
        assert_2x_pytorch(a, p, e, floor, name)

"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90 on a machine without a GPU, and
the resources of each compiled kernel (shared memory, registers, spills).

A `Job` is one `triton.compile`: (family, kernel, constexprs, dtype, num_warps, arch, spec). Two sets:

- `default_jobs(family)`: what the public ops launch for real shapes (`REAL_SHAPES`: the @gpu tests'
  shapes in every dtype they run, for sm_90; the models' — TNT-S / TNT-B inner and outer, RTNT,
  Nested-TNT-S, TinT — in float32 / bfloat16 (and bfloat16 autocast of the fused block), for sm_80 and
  sm_90), captured by `capture_launches`: the launchers run on CPU tensors while every Triton launch
  records, instead of running, exactly what the JIT would compile (its own binder: ints equal to 1
  become constants, pointers and ints divisible by 16 carry the divisibility hint; `spec`), with the
  shared-memory limit of the architecture given to the fit checks, so a configuration the dispatcher
  refuses there is not in the set. What `pytest -m aot` compiles (minutes cold).
- `every_job(family)`: every configuration the launchers can choose (the modules' `triton_configs()`),
  unspecialised (every int an i32), the opt-in sweep `TNTKERNELS_AOT=all pytest -m aot`.

`compile_all(jobs)` compiles on at most two spawned processes (CI machines have 2 cores) and
remembers the results for the rest of the process, so the family tests and tests/ops/triton/
test_resources.py share one compilation. `compile_job` checks that the PTX targets the architecture
(and uses tensor-core mma for 16-bit `tl.dot`) and reads the resources: `metadata.shared` from Triton,
registers and local memory (stack frame + local arrays) from `cuobjdump --dump-resource-usage` on the
cubin: what the driver reports as `CompiledKernel.n_regs` / `n_spills` after `_init_handles()`, which
needs a GPU (n_spills = local memory bytes / 4, as Triton's driver computes it). A kernel whose shared
memory exceeds the architecture's limit could never launch: it stops after Triton's LLVM-IR stage,
where the shared memory is known, which saves PTX generation and ptxas, the slow part for those
(registers and spills unknown; `cubin=True` builds it to the end).

`SHARED_LIMIT` is the most shared memory one block may use per architecture; `KNOWN_OVER_LIMIT` lists
default-set kernels that exceed it (they would raise OutOfResources at their first launch), each with
its reason — none today; tests/ops/triton/test_resources.py checks that table exactly.
scripts/triton_resources.py writes the table docs/triton-resources.md from the same jobs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import subprocess
import tempfile
import types
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARCHS = (80, 90)
# the largest dynamic shared memory one block may opt in to (CUDA C Programming Guide, compute
# capabilities table): 227 KB on sm_90 (H100), 163 KB on sm_80 (A100)
SHARED_LIMIT = {80: 166_912, 90: 232_448}
MAX_PROCESSES = 2  # CI machines have 2 cores
FAMILIES = ("inner_attention", "inner_block", "nested_attention", "hsim_split_linear")
H100_SMS = 132  # streaming multiprocessors of an H100 SXM / H200 (what launchers sizing grids see)
AOT_ENV = "TNTKERNELS_AOT"  # "all": the opt-in sweep over every configuration


def pointer(dtype: torch.dtype) -> str:
    """The Triton pointer type for a tensor of `dtype`, e.g. '*bf16'."""
    return "*" + TRITON_TYPES[dtype]


def sweep_requested() -> bool:
    """True when TNTKERNELS_AOT=all asks for every configuration."""
    return os.environ.get(AOT_ENV, "").strip().lower() == "all"


def _module(family: str):
    return importlib.import_module(f"tntkernels.ops.triton.{family}")


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, order=True)
class Job:
    """One triton.compile. dtype: the tensors' type ('bf16'); for inner_block 'fp32+bf16' is a float32
    residual stream with bfloat16 parameters and GEMM inputs (autocast)."""
    family: str
    kernel: str
    constexprs: tuple[tuple[str, object], ...]
    dtype: str
    warps: int
    arch: int
    # What the JIT specialised for one launch (`capture_launches`): (signature items, constexpr items by
    # argument index, argument indices with tt.divisibility 16, options items); () = unspecialised
    # (every int an i32, no alignment hints: the opt-in sweep)
    spec: tuple = ()

    @property
    def config(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.constexprs) + f" warps={self.warps}"

    @property
    def specialisation(self) -> str:
        """'=1: H · ÷16: 21/30 · a1b2c3': the int arguments the JIT made the constant 1, how many
        arguments carry the divisibility-by-16 hint, and a short hash of the whole spec; '—' if none."""
        if not self.spec:
            return "—"
        import hashlib

        sig, consts, div16, _ = self.spec
        names = [name for name, _ in sig]
        ones = [names[i] for (i,), v in consts if names[i] not in dict(self.constexprs)]
        digest = hashlib.sha1(repr(self.spec).encode()).hexdigest()[:6]
        return f"=1: {','.join(ones) or '-'} · ÷16: {len(div16)}/{len(names)} · {digest}"

    @property
    def id(self) -> str:
        tail = f"-{self.specialisation.rsplit(' ', 1)[-1]}" if self.spec else ""
        return f"{self.kernel}-{self.config.replace(' ', ',')}-{self.dtype}-sm{self.arch}{tail}"

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        """How KNOWN_OVER_LIMIT names a job: (family, kernel, config, dtype, arch)."""
        return self.family, self.kernel, self.config, self.dtype, self.arch

    def types(self) -> dict[str, str]:
        """Triton types of the non-constexpr arguments that are not i32."""
        x, _, c = self.dtype.partition("+")
        xp, cp = "*" + x, "*" + (c or x)
        if self.family == "inner_attention":
            types = {name: xp for name in ("Q", "K", "V", "Out", "O", "dO", "dQ", "dK", "dV")}
            types.update(Lse="*fp32", scale="fp32")
        elif self.family == "inner_block":
            mod = _module("inner_block")
            types = {name: xp for name in ("X", "Y", "dX", "dY")}
            types.update({name: cp for name in mod.PARAM_POINTERS})
            types.update({name: "*fp32" for name in ("SA", "SM", "Part", *mod.LN_POINTERS)})  # as launched
            types.update(eps1="fp32", eps2="fp32", scale="fp32")
        elif self.family == "nested_attention":
            types = {name: xp for name in ("Q", "K", "V", "Prev", "Noise", "W1", "B1", "W2", "B2", "W3", "B3",
                                           "Out", "Z", "GO", "GZ", "dQ", "dK", "dV", "dPrev")}
            types.update({name: "*fp32" for name in ("Lse", "Delta", "dW1", "dB1", "dW2", "dB2", "dW3", "dB3")})
            types["scale"] = "fp32"
        else:
            types = {name: xp for name in ("X", "Y", "X0", "DY", "M", "MB", "A", "AB")}
            types.update({name: "*fp32" for name in ("dMp", "dmp", "dAp", "dap")})
        return types

    @property
    def expect_mma(self) -> bool:
        """16-bit tl.dot inputs must lower to tensor-core mma (the H_sim mix kernel has no tl.dot)."""
        compute = self.dtype.partition("+")[2] or self.dtype
        return compute != "fp32" and self.kernel != "_hsim_split_linear_mix_kernel"


def _job(family, kernel, constexprs: dict, dtype: str, warps: int, arch: int) -> Job:
    return Job(family, kernel, tuple(constexprs.items()), dtype, int(warps), arch)


def _label(x: torch.dtype, compute: torch.dtype | None = None) -> str:
    return TRITON_TYPES[x] if compute in (None, x) else f"{TRITON_TYPES[x]}+{TRITON_TYPES[compute]}"


# ---------------------------------------------------------------------------------------------
# What the runtime compiles: launches captured from the public ops at real shapes
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def capture_launches(arch: int, launches: list):
    """Inside, every Triton launch runs nothing: it appends (JITFunction, signature, constexprs, attrs,
    options) to `launches` exactly as the JIT specialises it for sm_<arch> (its own binder: ints equal
    to 1 become constants, pointers and ints divisible by 16 get the tt.divisibility hint; CPU
    tensors are aligned like CUDA ones for this purpose, data_ptr % 16 depends on the view's offset),
    and returns None; an autotuned kernel records every config; a launcher asking for the SM count gets
    an H100's / H200's (H100_SMS), a fit check asking for the shared-memory limit gets sm_<arch>'s
    (so a configuration the dispatcher would not launch there raises its ValueError instead).
    `triton` may run on CPU tensors (the registry's availability check is lifted), so the public ops
    drive the launchers as on a GPU."""
    from unittest import mock

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from tntkernels import _backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    real_unavailable = _backend.why_unavailable

    def run(fn, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        names = {p.name for p in fn.params}
        opts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
        launches.append((fn, signature, constexprs, attrs, opts))

    def tuned_run(tuner, *args, **kwargs):
        for config in tuner.configs:
            tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    sms = types.SimpleNamespace(multi_processor_count=H100_SMS, name="AOT (H100 / H200)")
    limit = lambda device: SHARED_LIMIT[arch] // 1024  # noqa: E731 - what the fit checks see for sm_<arch>
    with mock.patch.object(JITFunction, "run", run), mock.patch.object(Autotuner, "run", tuned_run), \
            mock.patch.object(_backend, "why_unavailable",
                              lambda b, device: None if b == "triton" else real_unavailable(b, device)), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: sms), \
            mock.patch.object(_module("nested_attention"), "shared_limit_kb", limit), \
            mock.patch.object(_module("inner_block"), "shared_limit_kb", limit):
        yield launches


def _jobs_of(family: str, arch: int, launches: list) -> list[Job]:
    out = []
    for fn, signature, constexprs, attrs, opts in launches:
        names = fn.arg_names
        declared = {p.name for p in fn.params if p.is_constexpr}
        launcher = {names[i]: v for (i,), v in constexprs.items() if names[i] in declared}
        spec = (tuple(signature.items()), tuple(sorted((path, v) for path, v in constexprs.items())),
                tuple(sorted(path for path, attr in attrs.items() if ["tt.divisibility", 16] in attr)), opts)
        out.append(Job(family, fn.__name__, tuple(launcher.items()), _dtype_label(family, signature), int(dict(opts)["num_warps"]),
                       arch, spec))
    return out


def _dtype_label(family: str, signature: dict) -> str:
    """'bf16', or for the fused inner block under autocast 'fp32+bf16' (x's type + the weights')."""
    x = signature[{"inner_attention": "Q", "inner_block": "X", "nested_attention": "Q",
                   "hsim_split_linear": "X"}[family]].lstrip("*")
    if family == "inner_block":
        w = signature["QKW"].lstrip("*")
        return x if w == x else f"{x}+{w}"
    return x


def _empty(shape, dtype, layout="c", width=None):
    """An uninitialised tensor of `shape` in a layout the ops meet: "c" contiguous; "t" the last two but
    one dims swapped in memory ((S, m, H, d) viewed as (S, H, m, d)); "s" a slice [3 : 3 + D] of rows
    of width D + 5."""
    if layout == "t" and len(shape) == 4:
        S, H, m, d = shape
        return torch.empty(S, m, H, d, dtype=dtype).transpose(1, 2)
    if layout == "t" and len(shape) == 3:  # inner block x (S, m, C) stored (m, S, C)
        S, m, C = shape
        return torch.empty(m, S, C, dtype=dtype).transpose(0, 1)
    if layout == "t" and len(shape) == 2:
        return torch.empty(shape[1], shape[0], dtype=dtype).t()
    if layout == "s":
        return torch.empty(*shape[:-1], shape[-1] + 5, dtype=dtype)[..., 3:3 + shape[-1]]
    return torch.empty(shape, dtype=dtype)


def _attention_heads(S, H, m, d, dv, dtype):
    """q, k, v as nn.Attention (timm's TNT Attention) makes them: views of the qk and v Linear outputs."""
    q, k = torch.empty(S, m, 2 * H * d, dtype=dtype).reshape(S, m, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    v = torch.empty(S, m, H * dv, dtype=dtype).reshape(S, m, H, dv).permute(0, 2, 1, 3)
    return q, k, v


def _run_inner_attention(S, H, m, d, dv, layout, dtype):
    import tntkernels

    if layout == "module":
        q, k, v = _attention_heads(S, H, m, d, dv, dtype)
    elif layout == "qkv":  # the GPU test's: permuted views of one (S, m, 3·H·d) buffer
        q, k, v = torch.empty(S, m, 3 * H * d, dtype=dtype).reshape(S, m, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (_empty((S, H, m, n), dtype, layout) for n in (d, d, dv))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = tntkernels.inner_attention(q, k, v, backend="triton")
    out.backward(torch.empty_like(out))


def _run_inner_block(S, m, C, H, qkv_bias, drop_path, layout, x_dtype, compute):
    import tntkernels
    from tntkernels.ops.reference.inner_block import OPTIONAL_PARAMS, param_shapes

    x = _empty((S, m, C), x_dtype, layout).requires_grad_()
    params = {name: torch.empty(shape, dtype=x_dtype).requires_grad_() for name, shape in param_shapes(C, 4 * C).items()
              if qkv_bias or name not in OPTIONAL_PARAMS}
    scales = (torch.ones(S), torch.ones(S)) if drop_path else None
    y = tntkernels.inner_block(x, params, num_heads=H, drop_path_scales=scales,
                               compute_dtype=None if compute == x_dtype else compute, backend="triton")
    y.backward(torch.empty_like(y))


def _run_nested(B, H, T, d, dv, form, prev, noise, layout, dtype):
    import tntkernels

    if layout == "module":
        q, k, v = _attention_heads(B, H, T, d, dv, dtype)
    else:
        q, k, v = (_empty((B, H, T, n), dtype, layout) for n in (d, d, dv))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    prev_logits = torch.zeros(B, H, T, T, dtype=dtype).requires_grad_() if prev else None
    F = 4 * H
    mlp = [torch.empty(shape, dtype=dtype).requires_grad_() for shape in ((F, H), (F,), (F, F), (F,), (H, F), (H,))]
    out, z = tntkernels.nested_attention(q, k, v, prev_logits, head_mlp=mlp if form == "coda" else None,
                                         noise=torch.zeros(B, H, T, T, dtype=dtype) if noise else None,
                                         backend="triton")
    torch.autograd.backward([out, z], [torch.zeros_like(out), torch.zeros_like(z)])


def _run_hsim(lead, H, d, parts, biases, layout, dtype):
    import tntkernels

    x = _empty((*lead, H * d), dtype, layout).requires_grad_()
    M = torch.empty(d, H, H, dtype=dtype).requires_grad_() if "m" in parts else None
    m = torch.empty(d, H, dtype=dtype).requires_grad_() if "m" in parts and biases else None
    A = torch.empty(H, d, d, dtype=dtype).requires_grad_() if "b" in parts else None
    a = torch.empty(H, d, dtype=dtype).requires_grad_() if "b" in parts and biases else None
    y = tntkernels.hsim_split_linear(x, M, m, A, a, backend="triton")
    y.backward(torch.empty_like(y))


# Real shapes: name -> the full arguments of the family's runner above (without the dtype; the fused
# inner block's include its (x dtype, compute dtype) pairs). "GPU test" entries are the @gpu tests'
# cases of tests/ops/triton/test_<family>.py (each file checks it is covered); "module" layouts are the
# views nn.Attention passes (qk / v Linear outputs). TNT-S: inner (B·196, H 4, m 16, d 6, C 24, MLP 96),
# outer T 197, H 6, d 64; TNT-B: inner H 4, d 10, C 40, MLP 160, outer T 197 / 577, H 10, d 64;
# RTNT-N / -Ti: letters m 4, C 6 / 12 (d 6), words m 4, C 24 / 48 (d 12); TinT: D 768 / 3072, H 12
# (d 64 / 256), D 3072 H 48 (d 64). Batch 64 for the models (B·196 = 12,544 sentences).
REAL_SHAPES: dict[str, dict[str, tuple]] = {
    "inner_attention": {  # (S, H, m, d, dv, layout)
        "TNT-S inner, batch 64": (12_544, 4, 16, 6, 6, "module"),
        "TNT-B inner, batch 64": (12_544, 4, 16, 10, 10, "module"),
        "RTNT letters": (64 * 64 * 4, 2, 4, 6, 6, "module"),
        "RTNT words": (64 * 64, 4, 4, 12, 12, "module"),
        "GPU test TNT-S inner": (75_000, 4, 16, 6, 6, "qkv"),  # the GPU test's layout: "qkv" if d == dv else "t"
        "GPU test TNT-B inner": (300, 4, 16, 10, 10, "qkv"),
        "GPU test m 49": (50, 3, 49, 10, 10, "qkv"),
        "GPU test m 9, dv 20": (40, 2, 9, 12, 20, "t"),
        "GPU test m 64, d 64": (30, 2, 64, 64, 64, "qkv"),
        "GPU test m 1": (20, 3, 1, 6, 6, "qkv"),
    },
    "inner_block": {  # (S, m, C, H, qkv_bias, drop_path, layout)
        "TNT-S inner, batch 64": (12_544, 16, 24, 4, False, True, "c"),
        "TNT-B inner, batch 64": (12_544, 16, 40, 4, False, True, "c"),
        "RTNT-N letters": (64 * 64 * 4, 4, 6, 1, False, True, "c"),
        "RTNT-Ti letters": (64 * 64 * 4, 4, 12, 2, False, True, "c"),
        "RTNT-N words": (64 * 64, 4, 24, 2, False, True, "c"),
        "RTNT-Ti words": (64 * 64, 4, 48, 4, False, True, "c"),
        "GPU test TNT-S, batch 64": (12_544, 16, 24, 4, False, True, "t"),
        "GPU test TNT-B": (1_000, 16, 40, 4, True, False, "c"),
        "GPU test m 49": (300, 49, 20, 2, False, True, "c"),
        "GPU test RTNT letters": (2_000, 4, 8, 1, False, False, "t"),
    },
    "nested_attention": {  # (B, H, T, d, dv, form, prev, noise, layout); layer 1 (no prev): no head-MLP
        "Nested-TNT-S inner, layer 1": (12_544, 4, 16, 6, 6, "coda", False, True, "module"),
        "Nested-TNT-S inner, CODA": (12_544, 4, 16, 6, 6, "coda", True, True, "module"),
        "Nested-TNT-S outer, layer 1": (64, 6, 197, 64, 64, "coda", False, True, "module"),
        "Nested-TNT-S outer, CODA": (64, 6, 197, 64, 64, "coda", True, True, "module"),
        "GPU test TNT-S inner, batch 2": (392, 4, 16, 6, 6, "coda", True, True, "t"),
        "GPU test TNT-S inner, batch 64": (12_544, 4, 16, 6, 6, "coda", True, False, "t"),
        "GPU test TNT-S inner, RealFormer": (12_544, 4, 16, 6, 6, "real", True, True, "t"),
        "GPU test first layer": (392, 4, 16, 6, 6, "coda", False, False, "c"),
        "GPU test TNT-B inner, CODA": (300, 4, 16, 10, 10, "coda", True, False, "c"),
        "GPU test H 16, d 64, CODA": (40, 16, 64, 64, 64, "coda", True, True, "c"),
        "GPU test TNT-S outer, CODA": (64, 6, 197, 64, 64, "coda", True, True, "t"),
        "GPU test TNT-S outer, RealFormer": (64, 6, 197, 64, 64, "real", True, False, "t"),
        "GPU test TNT-B outer 384², CODA": (4, 10, 577, 64, 64, "coda", True, False, "c"),
        "GPU test T 49, RealFormer": (50, 3, 49, 10, 6, "real", True, False, "t"),
        # H > 8 with the head-MLP in 16-bit at d <= 16: the one BLOCK_H 16 CODA configuration an H100 / H200
        # runs (SHARED_KB: 216 KB of 227); compiled so test_resources checks that bound
        "Fit check H 12, d 16, CODA": (8, 12, 64, 16, 16, "coda", True, False, "c"),
    },
    "hsim_split_linear": {  # (lead, H, d, parts, biases, layout): parts "m" mix, "b" block
        "TinT D 768 (d 64), mix + block": ((2304,), 12, 64, "mb", True, "c"),
        "TinT D 768 (d 64), block": ((2304,), 12, 64, "b", True, "c"),
        "TinT D 768 (d 64), mix": ((2304,), 12, 64, "m", True, "c"),
        "TinT D 3072 (d 256), mix + block": ((2304,), 12, 256, "mb", True, "c"),
        "TinT D 3072 (d 256), block": ((2304,), 12, 256, "b", True, "c"),
        "TinT D 3072 (d 256), mix": ((2304,), 12, 256, "m", True, "c"),
        "TinT D 3072 · H 48 (d 64), mix + block": ((2304,), 48, 64, "mb", True, "c"),
        "GPU test TinT OPT-125M": ((2304,), 12, 256, "mb", True, "c"),
        "GPU test D 768, t": ((1280,), 12, 64, "mb", True, "t"),
        "GPU test block, N 8192": ((8192,), 12, 64, "b", True, "c"),
        "GPU test mix, s": ((777,), 12, 256, "m", True, "s"),
        "GPU test d 48, no biases": ((3, 100), 5, 48, "mb", False, "c"),
    },
}

# (x dtype, compute dtype) of the fused inner block: each dtype alone, and bfloat16 autocast (a float32
# stream, what the GPU test and bf16 mixed precision run); float16 autocast only in the sweep
INNER_BLOCK_DTYPES = ((torch.float32, torch.float32), (torch.float16, torch.float16),
                      (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16))
# Which dtypes and architectures each real shape is compiled for: a "GPU test" (or "Fit check") shape
# in every dtype, for sm_90 (the H100 / H200 the GPU tests run on); a model shape in what training runs
# (float32, bfloat16; the fused block also under bfloat16 autocast), for sm_80 and sm_90. (Every
# specialisation is its own compile: the set is kept to what runs, to keep CI's AOT step to minutes.)
MODEL_DTYPES = ((torch.float32,), (torch.bfloat16,))
MODEL_BLOCK_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                      (torch.float32, torch.bfloat16))


def _plan(family: str, name: str) -> tuple[tuple, tuple[int, ...]]:
    """(dtype tuples, archs) a real shape is compiled for."""
    if name.startswith(("GPU test", "Fit check")):
        return (INNER_BLOCK_DTYPES if family == "inner_block" else [(dt,) for dt in DTYPES]), (90,)
    return (MODEL_BLOCK_DTYPES if family == "inner_block" else MODEL_DTYPES), ARCHS
_RUNNERS = {"inner_attention": _run_inner_attention, "inner_block": _run_inner_block,
            "nested_attention": _run_nested, "hsim_split_linear": _run_hsim}


NOT_LAUNCHED: dict[tuple[str, str, int], str] = {}  # (family, real shape + dtype, arch) -> the fit check's refusal


def run_shape(family: str, shape: tuple, name: str = "") -> list[Job]:
    """The jobs one real shape launches (forward + backward through the public op) in the dtypes and
    on the architectures of its `_plan`; a dtype whose configuration the fit check refuses there
    (shared memory) launches nothing (recorded in NOT_LAUNCHED)."""
    jobs = []
    dtypes, archs = _plan(family, name)
    for arch in archs:
        launches: list = []
        with capture_launches(arch, launches):
            for dts in dtypes:
                try:
                    _RUNNERS[family](*shape, *dts)
                except ValueError as refused:
                    NOT_LAUNCHED[(family, f"{name} {'+'.join(TRITON_TYPES[d] for d in dict.fromkeys(dts))}", arch)] = \
                        str(refused)
        jobs += _jobs_of(family, arch, launches)
    return jobs


_DEFAULT: dict[str, dict[Job, list[str]]] = {}


def default_jobs(family: str) -> dict[Job, list[str]]:
    """The default AOT set of one family: job -> the real shapes that launch it (deduplicated), as
    the JIT specialises them (`capture_launches`); computed once per process."""
    from tntkernels import _backend

    if _backend.triton_interpret():
        raise RuntimeError("aot.default_jobs captures launches: it needs Triton's compiler mode, not TRITON_INTERPRET=1")
    if family not in _DEFAULT:
        jobs: dict[Job, list[str]] = {}
        for name, shape in REAL_SHAPES[family].items():
            for job in run_shape(family, shape, name):
                users = jobs.setdefault(job, [])
                if name not in users:
                    users.append(name)
        _DEFAULT[family] = jobs
    return _DEFAULT[family]


def every_job(family: str) -> list[Job]:
    """Every configuration the family's launchers can choose (its `triton_configs()`), sm_80 and sm_90."""
    mod = _module(family)
    entries = []
    if family == "inner_attention":
        for bm, bd, bdv, pairs, dtype, warps in mod.triton_configs():
            c = dict(BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, PAIRS_PER_PROG=pairs)
            entries += [(k, c, _label(dtype), warps)
                        for k in ("_inner_attention_fwd_kernel", "_inner_attention_bwd_kernel")]
    elif family == "inner_block":  # the forward does not depend on BLOCK_R of the backward, and vice versa
        for br_fwd, br_bwd, bc, bd, bf, warps, x, compute in mod.triton_configs():
            entries += [(kernel, dict(BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, BLOCK_F=bf), _label(x, compute), warps)
                        for kernel, br in (("_inner_block_fwd_kernel", br_fwd), ("_inner_block_bwd_kernel", br_bwd))]
    elif family == "nested_attention":
        from tntkernels.ops.reference.nested_attention import LEAKY_SLOPE
        for bh, bf, bd, dtype, warps in mod.triton_configs():
            c = dict(BLOCK_H=bh, BLOCK_I=mod.BLOCK_I, BLOCK_J=mod.BLOCK_J, BLOCK_D=bd, BLOCK_F=bf, SLOPE=LEAKY_SLOPE)
            entries += [(k, c, _label(dtype), warps)
                        for k in ("_nested_attention_fwd_kernel", "_nested_attention_bwd_q_kernel", "_nested_attention_bwd_kv_kernel")]
    else:
        for kernel, configs in mod.triton_configs().items():
            for entry in configs:
                entry = dict(entry)
                dtype, warps = entry.pop("dtype"), entry.pop("num_warps")
                entries.append((kernel, entry, _label(dtype), warps))
    jobs = {_job(family, k, c, dt, w, arch): None for k, c, dt, w in entries for arch in ARCHS}
    return list(jobs)


# ---------------------------------------------------------------------------------------------
# Compilation and resources
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs: shared memory (bytes, Triton's metadata.shared), registers per
    thread, spills (local memory / 4, as Triton's CompiledKernel.n_spills), local memory per thread
    (bytes); PTX and cubin sizes; the compile's CPU seconds (this process and its ptxas). A kernel
    over the shared-memory limit stops after Triton's LLVM-IR stage, where the shared memory is known
    (it could never launch): its registers, spills and sizes are None, unless built with cubin=True."""
    shared: int
    n_regs: int | None
    n_spills: int | None
    local_bytes: int | None
    ptx_bytes: int | None
    cubin_bytes: int | None
    cpu_s: float

    @property
    def built(self) -> bool:
        return self.cubin_bytes is not None


def over_limit(job: Job, res: Resources) -> bool:
    return res.shared > SHARED_LIMIT[job.arch]


def by_config(pairs) -> dict[tuple, Resources]:
    """(job, resources) pairs merged per (family, kernel, config, dtype, arch), over the runtime
    specialisations of that configuration: the most shared memory, registers, spills and local memory
    (None stays None: a kernel over the limit is not built to the cubin)."""
    out: dict[tuple, Resources] = {}

    def most(a, b):
        return b if a is None else a if b is None else max(a, b)
    for job, res in pairs:
        old = out.get(job.key)
        out[job.key] = res if old is None else dataclasses.replace(
            old, shared=max(old.shared, res.shared), n_regs=most(old.n_regs, res.n_regs),
            n_spills=most(old.n_spills, res.n_spills), local_bytes=most(old.local_bytes, res.local_bytes))
    return out


_RESOURCE_LINE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, local memory bytes per thread) of kernel `name` in a cubin, from cuobjdump
    --dump-resource-usage; local memory = the stack frame (where ptxas spills) + local arrays, what the
    driver reports as CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    for match in _RESOURCE_LINE.finditer(out):
        if match.group(1) == name:
            return int(match.group(2)), int(match.group(3)) + int(match.group(5))
    raise RuntimeError(f"cuobjdump shows no resource usage for {name}:\n{out}")


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _OverLimit(Exception):
    def __init__(self, shared: int):
        super().__init__(shared)
        self.shared = shared


def _stop_over_limit(*args):
    """knobs.runtime.add_stages_inspection_hook: without arguments, its part of the cache key; with
    (backend, stages, options, language, capability), wraps the PTX stage so that a kernel whose
    shared memory (set by the LLVM-IR stage) exceeds the architecture's limit stops there."""
    if not args:
        return "tntkernels-aot-stop-over-shared-limit", "1"
    backend, stages = args[0], args[1]
    make_ptx, limit = stages["ptx"], SHARED_LIMIT[backend.target.arch]

    def ptx(src, metadata):
        if metadata["shared"] > limit:
            raise _OverLimit(int(metadata["shared"]))
        return make_ptx(src, metadata)
    stages["ptx"] = ptx


def compile_job(job: Job, cubin: bool = False) -> Resources:
    """triton.compile one job for sm_<arch>; checks the PTX, reads the resources. A kernel over the
    shared-memory limit stops after the LLVM-IR stage unless `cubin`."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    start = _cpu_seconds()
    kernel = getattr(_module(job.family), job.kernel)
    if job.spec:  # exactly what the JIT compiles for the captured launch
        sig, consts, div16, opts = job.spec
        source = triton.compiler.ASTSource(
            fn=kernel, signature=dict(sig), constexprs={path: value for path, value in consts},
            attrs={path: [["tt.divisibility", 16]] for path in div16})
        options = dict(opts)
    else:
        constexprs = dict(job.constexprs)
        types = job.types()
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = {"num_warps": job.warps}
        stages = getattr(_module(job.family), "NUM_STAGES", None)  # as the launchers pass it
        if stages is not None:
            options["num_stages"] = stages
    hook = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = None if cubin else _stop_over_limit
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options=options)
    except _OverLimit as over:
        return Resources(shared=over.shared, n_regs=None, n_spills=None, local_bytes=None, ptx_bytes=None,
                         cubin_bytes=None, cpu_s=round(_cpu_seconds() - start, 2))
    finally:
        knobs.runtime.add_stages_inspection_hook = hook
    ptx, binary = compiled.asm["ptx"], compiled.asm["cubin"]
    assert f".target sm_{job.arch}" in ptx, f"{job.id}: PTX does not target sm_{job.arch}"
    if job.expect_mma:
        assert "mma" in ptx, f"{job.id}: 16-bit tl.dot did not lower to tensor-core mma"
    n_regs, local = cubin_resources(binary, compiled.metadata.name)
    return Resources(shared=int(compiled.metadata.shared), n_regs=n_regs, n_spills=local // 4, local_bytes=local,
                     ptx_bytes=len(ptx), cubin_bytes=len(binary), cpu_s=round(_cpu_seconds() - start, 2))


_DONE: dict[Job, Resources] = {}  # this process's compiled jobs


def _cost(job: Job) -> tuple:
    """Longest first (the fused inner block's backward, then nested attention's backward, wide tiles),
    so that the two workers finish together."""
    c = dict(job.constexprs)
    size = c.get("BLOCK_C", 0) * 16 + c.get("BLOCK_F", 0) + c.get("BLOCK_D", 0) + c.get("BLOCK_J", 0)
    return (job.family != "inner_block", job.family != "nested_attention", "bwd" not in job.kernel,
            job.dtype != "fp32", -size, job)


def compile_all(jobs, processes: int = MAX_PROCESSES, progress=None, cubin: bool = False) -> list[Resources]:
    """compile_job for every job (results in the order of `jobs`), on at most `processes` spawned
    processes; jobs compiled earlier in this process are not compiled again. Raises RuntimeError
    naming every job that failed. progress(job, resources), if given, is called as each job
    finishes. cubin: build the kernels over the shared-memory limit to the end as well."""
    jobs = list(jobs)
    todo = sorted({j for j in jobs if j not in _DONE or (cubin and not _DONE[j].built)}, key=_cost)
    failed = []

    def done(job, get):
        try:
            _DONE[job] = get()
        except Exception as exc:  # noqa: BLE001 - reported below with the job's name
            failed.append(f"{job.id}: {type(exc).__name__}: {str(exc)[-2000:]}")
            return
        if progress:
            progress(job, _DONE[job])

    if len(todo) <= 1 or processes <= 1:
        for job in todo:
            done(job, lambda: compile_job(job, cubin))
    else:
        workers = min(len(todo), processes, os.cpu_count() or 1)
        with ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(compile_job, job, cubin): job for job in todo}
            for future in as_completed(futures):
                done(futures[future], future.result)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} compilations failed:\n" + "\n".join(failed))
    return [_DONE[job] for job in jobs]


def report_sweep(jobs: list[Job], results: list[Resources], seconds: float) -> None:
    """After the opt-in sweep: the default-set kernels over the limit must be KNOWN_OVER_LIMIT (as
    test_resources.py checks); the others over it (configurations no real shape launches) are
    reported as a warning, not failed. Details: python scripts/triton_resources.py --all."""
    import warnings

    default = {job for family in {j.family for j in jobs} for job in default_jobs(family)}
    over = [(j, r) for j, r in zip(jobs, results) if over_limit(j, r)]
    assert {j.key for j, _ in over if j in default} == {j.key for j in jobs if j in default} & set(KNOWN_OVER_LIMIT)
    others = [j for j, _ in over if j not in default]
    if others:
        warnings.warn(f"{len(others)} of {len(jobs)} configurations outside the default AOT set exceed the "
                      f"shared-memory limit: {', '.join(j.id for j in others[:8])}{', ...' if len(others) > 8 else ''}")
    print(f"compiled {len(jobs)} kernels in {seconds:.0f} s; {len(over)} over the shared-memory limit")


# ---------------------------------------------------------------------------------------------
# Known configurations over the shared-memory limit
# ---------------------------------------------------------------------------------------------

# The default-set kernels whose shared memory exceeds SHARED_LIMIT today (docs/triton-resources.md
# has the bytes); fixing the kernels removes their entries. Checked exactly by test_resources.py.
KNOWN_OVER_LIMIT: dict[tuple[str, str, str, str, int], str] = {
    # none: the configurations over a limit are refused by the dispatcher on that architecture (the
    # nested and fused-block modules' SHARED_KB) and routed elsewhere, so the default set holds none
}

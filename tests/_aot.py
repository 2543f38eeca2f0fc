"""Ahead-of-time compilation of our Triton kernels for sm_80 / sm_90 on a machine without a GPU.

Shared by the kernel tests: a job is (module, kernel, constexprs, types, arch, num_warps, expect_mma),
where `types` maps argument names to Triton types ("*bf16", "*fp32", "fp32"); every other argument
that is not a constexpr is an i32. `compile_job` runs `triton.compile` for one job and checks the
PTX targets the architecture (and uses tensor cores when `expect_mma`); `compile_all` runs a list of
jobs on at most two spawned processes (CI machines have 2 cores).
"""
from __future__ import annotations

import importlib
import os
from concurrent.futures import ProcessPoolExecutor

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ARCHS = (80, 90)


def pointer(dtype: torch.dtype) -> str:
    """The Triton pointer type for a tensor of `dtype`, e.g. '*bf16'."""
    return "*" + TRITON_TYPES[dtype]


def compile_job(module: str, kernel_name: str, constexprs: dict, types: dict, arch: int, warps: int,
                expect_mma: bool) -> tuple[int, int]:
    """triton.compile one kernel for sm_<arch>; returns (PTX bytes, cubin bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(module), kernel_name)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    assert f".target sm_{arch}" in ptx, f"{kernel_name}: PTX does not target sm_{arch}"
    if expect_mma:
        assert "mma" in ptx, f"{kernel_name}: 16-bit tl.dot did not lower to tensor-core mma"
    return len(ptx), len(cubin)


def compile_all(jobs: list[tuple]) -> list[tuple[int, int]]:
    """compile_job for every job, in order; on two spawned processes when there are more than two."""
    if len(jobs) <= 2:
        return [compile_job(*job) for job in jobs]
    workers = min(len(jobs), os.cpu_count() or 1, 2)
    with ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_job, *zip(*jobs)))

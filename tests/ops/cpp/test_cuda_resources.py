"""Static proof for the CUDA C++ kernels, no GPU needed: every fp16 / bf16 / fp32 kernel that
tntkernels._C carries for sm_90 keeps its per-thread state in registers — no stack frame, no local
memory (spills and local arrays both land there and cost a round trip to L1 / L2 per access).

The numbers are `cuobjdump --dump-resource-usage` of the cubins inside the built extension (what
`ptxas -v` printed into the build log, where scripts/quickstart.sh summarises sm_90's).
float64 instantiations are exempt (a double tile needs twice the registers; they exist for gradcheck).
KNOWN_STACK lists today's offenders with the reason: the test fails on any other kernel with a stack
frame, and on a listed one that no longer has one (remove its entry).
"""
import os
import re
import shutil
import subprocess

import pytest

from tntkernels import _backend

# demangled kernel name without its arguments -> why it has a stack frame today (sm_90)
KNOWN_STACK: dict[str, str] = {  # none today: every fp32 / fp16 / bf16 kernel keeps its state in registers
}

_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found is None and _backend.triton_importable():
        from triton import knobs  # Triton ships one with its ptxas

        path = knobs.nvidia.cuobjdump.path
        found = path if path and os.path.exists(path) else None
    return found


def kernel_resources() -> list[tuple[str, str, int, int, int]]:
    """(arch, demangled name without arguments, registers, stack bytes, local bytes) of every kernel
    in tntkernels._C's cubins."""
    import tntkernels._C as C

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's copy)")
    out = subprocess.run([tool, "--dump-resource-usage", C.__file__], capture_output=True, text=True,
                         check=True).stdout
    rows, arch, name = [], None, None
    for line in out.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif m := _LINE.search(line):
            regs, stack, _, local = map(int, m.groups())
            rows.append((arch, name, regs, stack, local))
    names = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    short = [re.sub(r"\(.*$", "", n.replace("tntkernels::(anonymous namespace)::", "")).removeprefix("void ")
             for n in names]
    return [(arch, s, regs, stack, local) for (arch, _, regs, stack, local), s in zip(rows, short)]


@pytest.mark.cuda_ext
def test_no_stack_frame_or_spills_on_sm90():
    rows = kernel_resources()
    sm90 = [r for r in rows if r[0] == "sm_90"]
    assert sm90, "tntkernels._C carries no sm_90 cubin (TORCH_CUDA_ARCH_LIST must include 9.0)"
    offenders = {name: (stack, local) for _, name, _, stack, local in sm90
                 if (stack or local) and "<double" not in name}
    new = {n: v for n, v in offenders.items() if n not in KNOWN_STACK}
    assert not new, f"kernels with a stack frame / local memory on sm_90 (bytes): {new}"
    fixed = sorted(set(KNOWN_STACK) - set(offenders))
    assert not fixed, f"no longer have a stack frame: remove them from KNOWN_STACK: {fixed}"


@pytest.mark.cuda_ext
def test_every_kernel_has_both_architectures():
    """Each kernel is compiled for sm_80 and sm_90 (A100, H100 / H200), and the parse found them all."""
    rows = kernel_resources()
    by_arch = {}
    for arch, name, *_ in rows:
        by_arch.setdefault(arch, set()).add(name)
    assert set(by_arch) == {"sm_80", "sm_90"}, sorted(by_arch)
    assert by_arch["sm_80"] == by_arch["sm_90"]
    assert any(n.startswith("inner_attention_fwd_kernel<float") for n in by_arch["sm_90"]), sorted(by_arch["sm_90"])[:5]

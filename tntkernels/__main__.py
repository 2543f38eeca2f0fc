"""`python -m tntkernels`: the version, and which backends this machine can run, with reasons."""
from __future__ import annotations

import platform

import torch

import tntkernels
from tntkernels import _backend
from tntkernels.ops import registry


def report() -> str:
    lines = [f"tntkernels {tntkernels.__version__} (torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"Python {platform.python_version()})"]
    cpu = torch.device("cpu")
    why = _backend.why_unavailable("cpu", cpu)
    lines.append(f"  C++ CPU   : {'available' if why is None else 'unavailable: ' + why}")
    if not _backend.cuda_compiled():
        lines.append(f"  CUDA C++  : unavailable: {_backend.why_unavailable('cuda', torch.device('cuda'))}")
    elif not torch.cuda.is_available():
        lines.append(f"  CUDA C++  : compiled for TORCH_CUDA_ARCH_LIST={_backend.cuda_archs()}, "
                     "but no CUDA device is visible on this machine")
    else:
        lines.append(f"  CUDA C++  : available (compiled for {_backend.cuda_archs()}; "
                     f"device {torch.cuda.get_device_name()})")
    if not _backend.triton_importable():
        lines.append("  Triton    : unavailable: the triton package is not installed")
    else:
        import triton
        if torch.cuda.is_available():
            lines.append(f"  Triton    : available (triton {triton.__version__})")
        elif _backend.triton_interpret():
            lines.append(f"  Triton    : interpreter only (triton {triton.__version__}, TRITON_INTERPRET=1, CPU tensors)")
        else:
            lines.append(f"  Triton    : unavailable: triton {triton.__version__} is installed but there is no "
                         "CUDA device (TRITON_INTERPRET=1 runs kernels on CPU tensors, slowly)")
    lines.append("  ops: backends, and backend=None's order on cpu / cuda "
                 f"(GPU kernels verified on hardware: {registry.GPU_KERNELS_VERIFIED})")
    for name, spec in registry.OPS.items():
        orders = "; ".join(f"{dev}: {' > '.join(registry.default_order(spec, torch.device(dev)))}"
                           for dev in ("cpu", "cuda"))
        lines.append(f"    {name:18s}: {', '.join(spec.implementations)}  [{orders}]")
        for backend, limits in spec.limits.items():
            values = limits()
            if values:
                lines.append(f"      {backend} limits: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

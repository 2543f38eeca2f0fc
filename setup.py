"""Builds the compiled extension tntkernels._C (C++ CPU ops, plus CUDA kernels when possible).

Build with `pip install --no-build-isolation .` (or `-e .`): an isolated build would download a
second torch and could compile against a different one than you run with.

Environment:
    TNTKERNELS_FORCE_CPU=1     build the C++ CPU ops only, even where nvcc and a CUDA torch exist.
    TNTKERNELS_FORCE_CUDA=1    fail (instead of falling back to CPU-only) when CUDA cannot be built.
    TORCH_CUDA_ARCH_LIST       GPU architectures to compile for; default "8.0;9.0" (A100, H100/H200),
                               also on a machine without a GPU.
    MAX_JOBS                   parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(msg: str) -> None:
    sys.stderr.write(f"\ntntkernels build error: {msg}\n\n")
    raise SystemExit(1)


def _guess_cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME, else the one holding nvcc (following symlinks), else
    /usr/local/cuda. torch guesses the parent of nvcc's folder, which is wrong for a wrapper script
    such as /usr/local/bin/nvcc, and then cannot find libcudart at link time."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(home, "bin", "nvcc")):
            return home
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _guess_cuda_home():
    os.environ["CUDA_HOME"] = _guess_cuda_home()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    _fail("PyTorch is not importable in this environment. Install torch >= 2.6 first "
          "(pip install torch), then build with `pip install --no-build-isolation .`.")

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if _TORCH_VERSION < (2, 6):
    _fail(f"torch >= 2.6 is required, found {torch.__version__}.")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _nvcc_path():
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_decision():
    """(build CUDA?, reason) for this environment."""
    if _truthy("TNTKERNELS_FORCE_CPU"):
        return False, "TNTKERNELS_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if _nvcc_path() is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"nvcc at {_nvcc_path()}, torch CUDA {torch.version.cuda}"


def _pip_cuda_include_dirs():
    """Header folders of the pip CUDA packages that come with torch (cuBLAS, cuSPARSE, ... headers).

    A bare nvcc toolkit may lack them, while ATen's CUDA headers include them. They also hold the
    CUDA runtime headers of torch's own CUDA version, which nvcc rejects if they come before the
    toolkit's: the caller adds them with -idirafter, after the toolkit's own headers.
    """
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(p for p in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(p))
    return list(dict.fromkeys(dirs))


def _extension():
    with_cuda, reason = _cuda_decision()
    if not with_cuda and _truthy("TNTKERNELS_FORCE_CUDA"):
        _fail(f"TNTKERNELS_FORCE_CUDA is set but the CUDA kernels cannot be built: {reason}.")
    sources = ["csrc/tntkernels.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Shared headers, included as "tntkernels/<name>.h" by the C++ and the nvcc compiles alike.
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-fno-trapping-math"]  # lets branch-free float selects vectorize; no value changes
    define_macros = []
    if not with_cuda:
        print(f"tntkernels: building the C++ CPU ops only ({reason})")
        return cpp_extension.CppExtension("tntkernels._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx}, define_macros=define_macros)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"tntkernels: building the C++ CPU ops and the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} ({reason})")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros += [("TNTKERNELS_WITH_CUDA", None), ("TNTKERNELS_CUDA_ARCHS", f'"{archs}"')]
    # -Xptxas=-v: ptxas prints every kernel's registers, stack frame and spills into the build log
    # (scripts/quickstart.sh summarises sm_90's; tests/ops/cpp/test_cuda_resources.py checks them)
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "2"), "-Xptxas=-v"]
    for inc in _pip_cuda_include_dirs():
        cxx += ["-idirafter", inc]
        nvcc += ["-Xcompiler", "-idirafter", "-Xcompiler", inc]
    return cpp_extension.CUDAExtension("tntkernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc})


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with a one-paragraph summary of what to check when compiling fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # the compiler's own output is printed above this
            with_cuda, reason = _cuda_decision()
            _fail(f"compiling tntkernels._C failed ({type(exc).__name__}: {exc}).\n"
                  f"  torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA kernels: "
                  f"{'yes' if with_cuda else 'no'} ({reason}).\n"
                  "  Needs a C++17 compiler (g++ >= 9) and the Python headers; for CUDA, nvcc whose major "
                  "version matches torch's CUDA.\n  Set TNTKERNELS_FORCE_CPU=1 to build the CPU ops only.")


os.chdir(ROOT)
setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})

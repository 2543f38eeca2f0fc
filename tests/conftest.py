"""Test-suite wiring: one hook maps the markers to skips, and tests/ is on sys.path so that the
shared helpers import as `from helpers import ...`.

Markers (declared in pyproject.toml):
    gpu          needs a CUDA device
    cpp          needs the compiled extension tntkernels._C
    cuda_ext     needs tntkernels._C built with its CUDA kernels (nvcc; no GPU needed)
    triton       needs the triton package
    interpreter  runs Triton kernels on CPU tensors: only in the session started with
                 TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest -m interpreter`), skipped elsewhere
    aot          compiles Triton kernels ahead of time for sm_80 / sm_90 (needs triton, not the
                 interpreter); `pytest -m aot` selects exactly these
    slow         minutes-long end-to-end runs (run by CI; deselect with -m 'not slow')
    integration  runs in subprocesses (torchrun, the training CLI, our scripts): CI runs them on the
                 GPU machine's stack only (TNTKERNELS_SKIP_MARKERS on the other)
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tntkernels import _backend  # noqa: E402

INTERPRET = _backend.triton_interpret()


def _skip_reasons() -> dict[str, str | None]:
    triton_missing = None if _backend.triton_importable() else "the triton package is not installed"
    return {
        "gpu": None if torch.cuda.is_available() else "needs a CUDA device",
        "cpp": None if _backend.cpp_available() else f"tntkernels._C not built: {_backend._C_ERROR}",
        "cuda_ext": None if _backend.cuda_compiled() else "tntkernels._C built without its CUDA kernels",
        "triton": triton_missing,
        "interpreter": triton_missing or (None if INTERPRET else
                                          "runs in the TRITON_INTERPRET=1 session (pytest -m interpreter)"),
        "aot": triton_missing or ("TRITON_INTERPRET=1: ahead-of-time compiles need the compiler mode"
                                  if INTERPRET else None),
    }


# TNTKERNELS_SKIP_MARKERS="aot,integration": skip those markers in this run (CI's stacks; .ci/run)
SKIPPED_BY_ENV = {m.strip() for m in os.environ.get("TNTKERNELS_SKIP_MARKERS", "").split(",") if m.strip()}


def pytest_collection_modifyitems(config, items):
    reasons = _skip_reasons()
    for marker in SKIPPED_BY_ENV:
        reasons[marker] = reasons.get(marker) or f"TNTKERNELS_SKIP_MARKERS={','.join(sorted(SKIPPED_BY_ENV))}"
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


os.environ.setdefault("TNTKERNELS_TEST", "1")

"""pytest plugin: run timm's own model tests (its sdist's tests/test_models.py) on tntkernels models.

Loaded with `-p timm_swap_plugin` (tests/ on PYTHONPATH) by tests/test_timm_contract.py, in a
subprocess pytest; it is not a test module and does nothing in the main suite. Configured by
environment variables (read when the plugin loads, before timm's test module is imported, so the
models its `parametrize` lists name are already registered):

    TNTKERNELS_TIMM_IMPORT   comma-separated modules to import first (e.g. "tntkernels.models", which
                             registers our models in timm's registry)
    TNTKERNELS_TIMM_SWAP     fnmatch pattern of timm model names whose entrypoint is wrapped so that
                             every model it builds goes through `tntkernels.swap_in` (e.g. "tnt_*");
                             empty: no swap (models that are ours already)
    TNTKERNELS_TIMM_REPORT   path of a JSON report written at the end of the session: per test its
                             outcome, duration, the failure text, and how many models the wrapped
                             entrypoints built and swapped during it

Wrapping the registry's entrypoint (what `timm.create_model` calls, whatever name the test imported
it under) catches every build: plain, `features_only` (the feature wrapper is built inside the
entrypoint and swap_in walks into it), pruned, on the meta device, with num_classes / dtype / device
arguments. An entrypoint that raises (timm's bad-argument checks) raises unchanged.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib
import json
import os
import time

_IMPORTS = [m.strip() for m in os.environ.get("TNTKERNELS_TIMM_IMPORT", "").split(",") if m.strip()]
_SWAP_PATTERN = os.environ.get("TNTKERNELS_TIMM_SWAP", "").strip()
_REPORT = os.environ.get("TNTKERNELS_TIMM_REPORT", "").strip()

_state = {"builds": 0, "swapped_blocks": 0}
_results: dict[str, dict] = {}


def _wrap_entrypoint(name: str, fn):
    import tntkernels

    @functools.wraps(fn)
    def entrypoint(*args, **kwargs):
        model = fn(*args, **kwargs)
        model, report = tntkernels.swap_in(model)  # ValueError if it holds no timm TNT block: a real failure
        _state["builds"] += 1
        _state["swapped_blocks"] += report.num_blocks
        return model

    entrypoint.__tntkernels_swapped__ = True
    return entrypoint


def _install() -> list[str]:
    for module in _IMPORTS:
        importlib.import_module(module)
    if not _SWAP_PATTERN:
        return []
    from timm.models import _registry

    names = [n for n in _registry._model_entrypoints if fnmatch.fnmatch(n, _SWAP_PATTERN)]
    for name in names:
        fn = _registry._model_entrypoints[name]
        if not getattr(fn, "__tntkernels_swapped__", False):
            _registry._model_entrypoints[name] = _wrap_entrypoint(name, fn)
    if not names:
        raise RuntimeError(f"timm_swap_plugin: no timm model matches TNTKERNELS_TIMM_SWAP={_SWAP_PATTERN!r}")
    return names


_WRAPPED = _install()


def pytest_report_header(config):
    return (f"timm_swap_plugin: imports={_IMPORTS}, swap_in on {len(_WRAPPED)} timm entrypoints "
            f"({_SWAP_PATTERN or 'none'})")


def pytest_runtest_setup(item):
    item._tntkernels_builds = (_state["builds"], _state["swapped_blocks"])


def pytest_runtest_logreport(report):
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0, "longrepr": ""})
    entry["duration"] += report.duration
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["longrepr"] += f"[{report.when}] {report.longreprtext}\n"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        entry["longrepr"] += str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def pytest_runtest_teardown(item, nextitem):
    b0, s0 = getattr(item, "_tntkernels_builds", (_state["builds"], _state["swapped_blocks"]))
    entry = _results.setdefault(item.nodeid, {"outcome": "passed", "duration": 0.0, "longrepr": ""})
    entry["swapped_builds"] = _state["builds"] - b0
    entry["swapped_blocks"] = _state["swapped_blocks"] - s0


def pytest_sessionfinish(session, exitstatus):
    if _REPORT:
        with open(_REPORT, "w") as f:
            json.dump({"swap_pattern": _SWAP_PATTERN, "wrapped": _WRAPPED, "imports": _IMPORTS,
                       "exitstatus": int(exitstatus), "finished": time.time(), "tests": _results}, f, indent=1)

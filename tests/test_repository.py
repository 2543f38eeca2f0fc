"""Repository-wide properties: self-contained (nothing points outside it), no import circle inside
the package, and the op registry covers every public op."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import torch

import tntkernels
from tntkernels.ops import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tntkernels"


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / line for line in out.stdout.splitlines()]
    return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]


def test_nothing_points_outside_the_repository():
    """Facts the code relies on live in docs/; no file cites the team's private notes folder."""
    needle = "shared" + "/"  # spelled in two pieces so this file does not match itself
    hits = []
    for path in _tracked_files():
        if not path.exists() or path.suffix in {".png", ".so", ".pt", ".gz", ".npz"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                 if "../" + needle in line or needle + "specs" in line or needle + "reviews" in line]
    assert not hits, f"files pointing outside the repository: {hits}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules of tntkernels that `path` imports at module level (function-local imports excluded)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("tntkernels"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tntkernels"))
    return found


def test_no_import_circle_inside_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how a package is built, not a circle
    for m in graph:
        graph[m] = {i for i in graph[m] if not (m.startswith(i + ".") and modules[i].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_registry_covers_every_public_op():
    public = {"inner_attention", "inner_block", "nested_attention", "hsim_split_linear"}
    assert set(registry.OPS) == public
    for name, spec in registry.OPS.items():
        assert getattr(tntkernels, name).__module__ == f"tntkernels.ops.{name}"
        assert "reference" in spec.implementations
        assert set(spec.unsupported) <= set(spec.implementations)
        for order in spec.default_order.values():
            assert set(order) <= set(spec.implementations), (name, order)


def test_gpu_default_is_one_switch(monkeypatch):
    cuda = torch.device("cuda")
    assert all(registry.default_order(s, cuda) == ("reference",) for s in registry.OPS.values())
    monkeypatch.setattr(registry, "GPU_KERNELS_VERIFIED", True)
    assert registry.default_order(registry.OPS["inner_attention"], cuda)[:-1] == ("triton", "cuda")


def test_create_model_at_top_level():
    model = tntkernels.create_model("tnt_t_patch8_32", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "tnt_s_patch16_224" in tntkernels.list_models()


@pytest.mark.cpp
def test_cuda_limits_come_from_the_extension(monkeypatch):
    """Python's CUDA fit checks read tntkernels._C.limits() (csrc/include/tntkernels/limits.h):
    change an exported limit and the check moves with it."""
    from tntkernels import _backend

    limits = _backend.cpp_limits()
    for op in ("inner_attention", "nested_attention", "hsim_split_linear"):
        exported = {k.split(".", 2)[2]: v for k, v in limits.items() if k.startswith(op + ".cuda.")}
        assert exported and registry.OPS[op].limits["cuda"]() == exported
    q = torch.zeros(1, 1, 4, 64)
    assert registry.OPS["inner_attention"].unsupported["cuda"](q, q) is None
    monkeypatch.setattr(_backend, "cpp_limits", lambda: dict(limits, **{"inner_attention.cuda.max_head_dim": 32}))
    assert "d, dv <= 32" in registry.OPS["inner_attention"].unsupported["cuda"](q, q)


def test_report_lists_every_op():
    from tntkernels.__main__ import report

    text = report()
    for op in registry.OPS:
        assert f"    {op}" in text

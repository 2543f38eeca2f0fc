"""torch.compile(fullgraph=True) of every module (every backend) and model, forward and backward, on CPU.

fullgraph=True turns any graph break into an error, so each test fails on a break. The
"aot_eager" backend traces the forward and the backward through AOTAutograd (fake kernels and
registered autograd of our custom ops included) without generating code; outputs and gradients
must equal eager mode's. Every backend that runs on CPU here is covered ("reference", "cpu" when
the C++ extension is built, and the modules on "triton" in the TRITON_INTERPRET=1 session).
"""
import pytest
import torch

from tntkernels import _backend
from tntkernels.models import create_model
from tntkernels.nn import Attention, HsimSplitLinear, NestedAttention, NestedTNTBlock, TNTBlock

BACKENDS = ["reference"] + (["cpu"] if _backend.cpp_available() else [])
# the Triton kernels on CPU tensors run in the TRITON_INTERPRET=1 session (tests/conftest.py)
WITH_TRITON = BACKENDS + [pytest.param("triton", marks=pytest.mark.interpreter)]


def _check(module, *inputs, atol=1e-5):
    """Eager vs torch.compile(fullgraph=True, backend='aot_eager'): outputs and parameter gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (module, compiled):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same dropout / drop-path / noise draws
        out = fn(*inputs)
        flat = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        sum(o.float().square().mean() for o in flat).backward()
        outs.append((flat, [p.grad.clone() if p.grad is not None else None for p in module.parameters()]))
    (eager, geager), (comp, gcomp) = outs
    for a, b in zip(eager, comp):
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()
    for a, b in zip(geager, gcomp):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


@pytest.mark.parametrize("backend", WITH_TRITON)
def test_modules_compile_fullgraph(backend):
    torch.manual_seed(0)
    x = torch.randn(6, 16, 24)
    _check(Attention(24, 24, num_heads=4, backend=backend), x)
    words, sentences = torch.randn(8, 16, 24), torch.randn(2, 5, 48)  # B 2, N 4 sentences of 16 words
    _check(TNTBlock(dim=24, dim_out=48, num_pixel=16, num_heads_in=4, num_heads_out=4, drop_path=0.1,
                    backend=backend).train(), words, sentences)
    attn = NestedAttention(24, 24, num_heads=4, head_mlp=True, backend=backend).train()
    _check(attn, x, torch.randn(6, 4, 16, 16))
    _check(NestedTNTBlock(dim=24, dim_out=48, num_pixel=16, num_heads_in=4, num_heads_out=4, backend=backend).train(),
           words, sentences)
    for parts in ("mix+block", "mix", "block"):
        _check(HsimSplitLinear(48, 4, parts=parts, backend=backend), torch.randn(3, 5, 48))


@pytest.mark.parametrize("name", ["tnt_t_patch8_32", "rtnt_n_patch8_32", "nested_tnt_t_patch8_32"])
def test_models_compile_fullgraph(name):
    """Each model family on one backend, the C++ ops where built: the models' own code is the same on
    every backend, and test_modules_compile_fullgraph compiles every module on every backend."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, backend=BACKENDS[-1]).train()
    _check(model, torch.randn(2, *model.input_size), atol=1e-4)

"""Run every CUDA C++ op of tntkernels, forward and backward, once on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize.py
    compute-sanitizer --tool synccheck / initcheck ... (same)

Ops (csrc/tntkernels.cpp): torch.ops.tntkernels.inner_attention / inner_attention_backward,
nested_attention / nested_attention_backward (RealFormer form with and without previous logits,
CODA form with the head-MLP, with and without noise, with and without an upstream logits gradient),
hsim_split_linear / hsim_split_linear_backward (mix+block, mix only, block only, with and without
biases), each in float32, float16 and bfloat16, with sizes that are not multiples of the kernels'
tiles. The device is synchronized after every call so an error is reported at the op that made it;
every output is checked finite. --ops triton runs the Triton kernels (inner attention, nested
attention, H_sim-split, fused inner block) through the public functions. Prints one line per call
and "sanitize: N calls OK" at the end; exits 1 on the first error.

Without PYTORCH_NO_CUDA_MEMORY_CACHING=1, memcheck only sees accesses outside the caching
allocator's blocks: an overrun into a neighbouring tensor of the same block goes unnoticed.
Without a CUDA device: prints that it needs one and exits 2, or 0 with --allow-no-gpu.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CALLS = 0


def _check(name: str, outs, dev) -> None:
    global CALLS
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    for i, t in enumerate(outs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            raise FloatingPointError(f"{name}: output {i} is not finite")
    CALLS += 1
    print(f"ok  {name}", flush=True)


def _rand(gen, *shape, dtype, dev, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)


def inner_attention(gen, dev, dtype):
    ops = torch.ops.tntkernels
    dn = str(dtype).replace("torch.", "")
    for S, H, m, d, dv in ((5, 4, 16, 6, 6), (3, 3, 13, 10, 7), (2, 1, 1, 1, 1), (2, 2, 64, 64, 64)):
        q, k = _rand(gen, S, H, m, d, dtype=dtype, dev=dev), _rand(gen, S, H, m, d, dtype=dtype, dev=dev)
        v = _rand(gen, S, H, m, dv, dtype=dtype, dev=dev)
        scale = d ** -0.5
        name = f"inner_attention S={S} H={H} m={m} d={d} dv={dv} {dn}"
        out, lse = ops.inner_attention(q, k, v, scale)
        _check(name, (out, lse), dev)
        g = _rand(gen, S, H, m, dv, dtype=dtype, dev=dev)
        _check(name.replace("inner_attention", "inner_attention_backward"),
               ops.inner_attention_backward(g, q, k, v, out, lse, scale), dev)
    # strided operands, read in place: the views of one qkv Linear output (timm's Attention), a transposed gO
    S, H, m, d = 3, 4, 16, 6
    q, k, v = _rand(gen, S, m, 3 * H * d, dtype=dtype, dev=dev).reshape(S, m, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    g = _rand(gen, S, m, H, d, dtype=dtype, dev=dev).transpose(1, 2)
    name = f"inner_attention S={S} H={H} m={m} d={d} qkv views {dn}"
    out, lse = ops.inner_attention(q, k, v, d ** -0.5)
    _check(name, (out, lse), dev)
    _check(name.replace("inner_attention", "inner_attention_backward"),
           ops.inner_attention_backward(g, q, k, v, out, lse, d ** -0.5), dev)


def nested_attention(gen, dev, dtype):
    ops = torch.ops.tntkernels
    dn = str(dtype).replace("torch.", "")
    cases = [  # (B, H, T, d, dv, prev, mlp, noise, grad_logits)
        (2, 4, 16, 6, 6, False, False, False, True),   # first layer (no previous logits)
        (2, 4, 16, 6, 6, True, False, False, True),    # RealFormer
        (2, 4, 16, 6, 6, True, True, False, True),     # CODA head-MLP
        (3, 3, 13, 10, 7, True, True, True, True),     # CODA, odd sizes, noise
        (3, 3, 13, 10, 7, True, False, True, False),   # RealFormer, no upstream logits gradient
        (1, 16, 64, 64, 64, True, True, False, True),  # the CUDA limits: T = 64, H = 16, d = 64
        (2, 6, 1, 1, 1, True, True, False, True),
    ]
    for B, H, T, d, dv, has_prev, has_mlp, has_noise, has_gl in cases:
        q, k = _rand(gen, B, H, T, d, dtype=dtype, dev=dev), _rand(gen, B, H, T, d, dtype=dtype, dev=dev)
        v = _rand(gen, B, H, T, dv, dtype=dtype, dev=dev)
        prev = _rand(gen, B, H, T, T, dtype=dtype, dev=dev) if has_prev else None
        mlp = []
        if has_mlp:
            for shape in ((4 * H, H), (4 * H,), (4 * H, 4 * H), (4 * H,), (H, 4 * H), (H,)):
                mlp.append(_rand(gen, *shape, dtype=dtype, dev=dev, scale=0.2))
        noise = _rand(gen, B, H, T, T, dtype=dtype, dev=dev) if has_noise else None
        scale = d ** -0.5
        form = "coda" if has_mlp else "realformer"
        name = (f"nested_attention[{form}{'' if has_prev else ', no prev'}{', noise' if has_noise else ''}] "
                f"B={B} H={H} T={T} d={d} dv={dv} {dn}")
        out, logits, lse = ops.nested_attention(q, k, v, prev, mlp, noise, scale)
        _check(name, (out, logits, lse), dev)
        g = _rand(gen, B, H, T, dv, dtype=dtype, dev=dev)
        gl = _rand(gen, B, H, T, T, dtype=dtype, dev=dev) if has_gl else None
        bname = name.replace("nested_attention[", "nested_attention_backward[") + ("" if has_gl else " grad_logits=None")
        _check(bname, ops.nested_attention_backward(g, gl, q, k, v, prev, mlp, noise, out, lse, scale), dev)


def hsim_split(gen, dev, dtype):
    ops = torch.ops.tntkernels
    dn = str(dtype).replace("torch.", "")
    for N, H, d in ((37, 4, 12), (5, 3, 7), (1, 1, 1), (70, 12, 64), (9, 64, 4), (3, 2, 256)):
        x = _rand(gen, N, H * d, dtype=dtype, dev=dev)
        M, mb = _rand(gen, d, H, H, dtype=dtype, dev=dev, scale=0.3), _rand(gen, d, H, dtype=dtype, dev=dev)
        A, ab = _rand(gen, H, d, d, dtype=dtype, dev=dev, scale=d ** -0.5), _rand(gen, H, d, dtype=dtype, dev=dev)
        for parts, params in (("mix+block", (M, mb, A, ab)), ("mix+block, no bias", (M, None, A, None)),
                              ("mix", (M, mb, None, None)), ("block", (None, None, A, ab))):
            name = f"hsim_split_linear[{parts}] N={N} H={H} d={d} {dn}"
            y = ops.hsim_split_linear(x, *params)
            _check(name, y, dev)
            g = _rand(gen, N, H * d, dtype=dtype, dev=dev)
            _check(name.replace("hsim_split_linear[", "hsim_split_linear_backward["),
                   ops.hsim_split_linear_backward(g, x, *params), dev)


def triton_ops(gen, dev, dtype):
    """The Triton kernels through the public functions (forward + autograd backward)."""
    import tntkernels
    from tntkernels.ops.reference.inner_block import param_shapes
    dn = str(dtype).replace("torch.", "")

    def fb(name, fn, leaves):
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        _check(f"{name} {dn}", outs, dev)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(dev)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves)
        _check(f"{name} backward {dn}", grads, dev)

    q, k, v = (_rand(gen, 7, 4, 16, 6, dtype=dtype, dev=dev).requires_grad_() for _ in range(3))
    fb("triton inner_attention S=7 H=4 m=16 d=6", lambda: tntkernels.inner_attention(q, k, v, backend="triton"), [q, k, v])
    q, k, v = (_rand(gen, 2, 4, 13, 10, dtype=dtype, dev=dev).requires_grad_() for _ in range(3))
    prev = _rand(gen, 2, 4, 13, 13, dtype=dtype, dev=dev).requires_grad_()
    mlp = [_rand(gen, *s, dtype=dtype, dev=dev, scale=0.2).requires_grad_()
           for s in ((16, 4), (16,), (16, 16), (16,), (4, 16), (4,))]
    fb("triton nested_attention[coda] B=2 H=4 T=13 d=10",
       lambda: tntkernels.nested_attention(q, k, v, prev, head_mlp=mlp, backend="triton"), [q, k, v, prev, *mlp])
    fb("triton nested_attention[realformer] B=2 H=4 T=13 d=10",
       lambda: tntkernels.nested_attention(q, k, v, prev, backend="triton"), [q, k, v, prev])
    x = _rand(gen, 37, 48, dtype=dtype, dev=dev).requires_grad_()
    M, mb = _rand(gen, 12, 4, 4, dtype=dtype, dev=dev).requires_grad_(), _rand(gen, 12, 4, dtype=dtype, dev=dev).requires_grad_()
    A, ab = _rand(gen, 4, 12, 12, dtype=dtype, dev=dev).requires_grad_(), _rand(gen, 4, 12, dtype=dtype, dev=dev).requires_grad_()
    fb("triton hsim_split_linear N=37 H=4 d=12",
       lambda: tntkernels.hsim_split_linear(x, M, mb, A, ab, backend="triton"), [x, M, mb, A, ab])
    C, hidden, m, S = 24, 96, 16, 9
    params = {n: (_rand(gen, *s, dtype=torch.float32, dev=dev, scale=0.2) + (1 if n.endswith("norm_in.weight") else 0))
              .requires_grad_() for n, s in param_shapes(C, hidden).items()}
    x = _rand(gen, S, m, C, dtype=torch.float32, dev=dev).requires_grad_()
    fb(f"triton inner_block S={S} m={m} C={C} (fp32 stream, compute)",
       lambda: tntkernels.inner_block(x, params, num_heads=4, compute_dtype=dtype, backend="triton"), [x, *params.values()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allow-no-gpu", action="store_true", help="exit 0 (not 2) when there is no CUDA device")
    ap.add_argument("--ops", nargs="+", choices=("cpp", "triton"), default=["cpp"],
                    help="cpp: the CUDA C++ ops (default); triton: the Triton kernels through the public functions")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the same calls on the C++ CPU ops (checks this "
                    "script, not the CUDA kernels)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
                    default=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"sanitize.py needs a CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              f"no CUDA device here; nothing was run", flush=True)
        return 0 if args.allow_no_gpu else 2
    from tntkernels import _backend
    if "cpp" in args.ops and not _backend.cpp_available():
        print(f"sanitize.py: tntkernels._C is not built ({_backend._C_ERROR})", flush=True)
        return 1
    if "cpp" in args.ops and args.device != "cpu" and not _backend.cuda_compiled():
        print("sanitize.py: tntkernels._C has no CUDA kernels (build it with TNTKERNELS_FORCE_CUDA=1)", flush=True)
        return 1
    dev = torch.device(args.device)
    print(f"sanitize: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU ops'}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"caching allocator {'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on'}", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    t0 = time.perf_counter()
    groups = []
    for dtype in (getattr(torch, n) for n in args.dtypes):
        if "cpp" in args.ops:
            groups += [(f"inner_attention {dtype}", inner_attention, dtype), (f"nested_attention {dtype}", nested_attention, dtype),
                       (f"hsim_split {dtype}", hsim_split, dtype)]
        if "triton" in args.ops:
            groups.append((f"triton ops {dtype}", triton_ops, dtype))
    failed = []
    for name, fn, dtype in groups:  # an error in one group does not stop the others
        try:
            fn(gen, dev, dtype)
        except Exception as exc:  # noqa: BLE001  reported, then the next group runs
            failed.append(name)
            print(f"FAILED {name} (after {CALLS} calls in all): {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    if failed:
        print(f"sanitize: {len(failed)} of {len(groups)} groups failed: {', '.join(failed)}", flush=True)
        return 1
    print(f"sanitize: {CALLS} calls OK ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

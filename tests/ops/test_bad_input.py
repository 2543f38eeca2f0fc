"""Bad input: one case per row of docs/bad-input.md, which is the single source of truth.

Each row of the tables in docs/bad-input.md has an id, the exception type and a fragment of its message;
`CASES` below holds, for each id, the call that builds that bad input. `test_row` runs the call and checks
the type and the fragment read from the document, so the document and the code cannot drift apart;
`test_table_matches_cases` checks both sides have the same ids.

Setups (how a row that needs another machine is reached on a CPU-only one, all without launching a kernel):
    "interpret":  TRITON_INTERPRET=1, so the 'triton' backend resolves for CPU tensors and its range
                  checks run (they raise before any kernel is launched);
    "fake_cuda":  every backend reported available (`_backend.why_unavailable` patched) and meta tensors,
                  so the 'cuda' backend's range checks run without a GPU (nothing is computed on meta);
    "cpp":        needs the compiled extension (a 'cpu'-backend row whose message names the device);
    "no_cpp":     the compiled extension hidden (`_backend._C = None`), as on a machine where it did not build.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tntkernels
from tntkernels import _backend, hsim_split_linear, inner_attention, inner_block, nested_attention
from tntkernels.nn import Attention, DropPath, HeadMlp, HsimSplitLinear, NestedAttention, NestedTNTBlock, TNTBlock
from tntkernels.ops.reference.inner_block import param_shapes as _param_shapes

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
EXCEPTIONS = {"ValueError": ValueError, "TypeError": TypeError, "RuntimeError": RuntimeError}
ROW = re.compile(r"^\|\s*`(?P<id>[a-z0-9-]+)`\s*\|(?P<rest>.*)\|\s*$")


def read_table(path: Path = DOC) -> dict[str, tuple[str, str]]:
    """Row id -> (exception name, message fragment), from every row `| `id` | op | condition | `Exc` | `fragment` |`."""
    rows: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = ROW.match(line)
        if m is None:
            continue
        cells = [c.strip() for c in m.group("rest").split("|")]
        assert len(cells) == 4, f"{path.name}:{n}: expected 5 cells (id, op, condition, raises, message), got {line!r}"
        exc, frag = cells[2], cells[3]
        assert re.fullmatch(r"`\w+`", exc), f"{path.name}:{n}: the exception cell must be `Name`, got {exc!r}"
        assert re.fullmatch(r"`[^`]+`", frag), f"{path.name}:{n}: the message cell must be one `fragment`, got {frag!r}"
        assert m.group("id") not in rows, f"{path.name}:{n}: duplicate row id {m.group('id')!r}"
        rows[m.group("id")] = (exc.strip("`"), frag[1:-1])
    return rows


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def qkv(B=2, H=3, T=5, d=4, dv=None, **kw):
    """q, k (B, H, T, d) and v (B, H, T, dv) for inner_attention (S = B, m = T) and nested_attention."""
    return t(B, H, T, d, **kw), t(B, H, T, d, **kw), t(B, H, T, dv or d, **kw)


def head_mlp(H=3, **kw):
    return (t(4 * H, H, **kw), t(4 * H, **kw), t(4 * H, 4 * H, **kw), t(4 * H, **kw), t(H, 4 * H, **kw), t(H, **kw))


def ia(backend=None, scale=None, **kw):
    q, k, v = qkv(**{n: kw.pop(n) for n in ("H", "T", "d", "dv", "dtype", "device") if n in kw})
    args = dict(q=q, k=k, v=v)
    args.update(kw)
    return inner_attention(args["q"], args["k"], args["v"], scale=scale, backend=backend)


def na(backend=None, **kw):
    shape = {n: kw.pop(n) for n in ("H", "T", "d", "dv", "dtype", "device") if n in kw}
    q, k, v = qkv(**shape)
    args = dict(q=q, k=k, v=v, prev_logits=None)
    args.update(kw)
    q, k, v, prev = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prev_logits")
    return nested_attention(q, k, v, prev, backend=backend, **args)


def mlp_with(i, value, H=3):
    mlp = list(head_mlp(H))
    mlp[i] = value
    return tuple(mlp)


def hs(x=None, backend=None, **weights):
    return hsim_split_linear(t(3, 12) if x is None else x, backend=backend, **weights)


def ib_params(C=8, hidden=None, dtype=torch.float32, **replace):
    p = {n: t(*s, dtype=dtype) for n, s in _param_shapes(C, hidden or 4 * C).items()}
    p.update(replace)
    return p


def ib(x=None, params=None, num_heads=2, **kw):
    return inner_block(t(3, 5, 8) if x is None else x, ib_params() if params is None else params,
                       num_heads=num_heads, **kw)


def tnt(block=None, pixel=(6, 4, 8), patch=(2, 4, 16), **logits):
    """TNTBlock(c 8, d 16, m 4): pixel_embed (B·N, m, c) = (6, 4, 8) with patch_embed (B, N + 1, d) = (2, 4, 16)."""
    block = block or TNTBlock(8, 16, 4, num_heads_in=2, num_heads_out=2)
    px = t(*pixel) if isinstance(pixel, tuple) else pixel
    pt = t(*patch) if isinstance(patch, tuple) else patch
    return block(px, pt, **logits)


def nested_tnt(**kw):
    return tnt(NestedTNTBlock(8, 16, 4, num_heads_in=2, num_heads_out=2, noise=False), **kw)


META = dict(device="meta")
INF, NAN = float("inf"), float("nan")

# id -> (setup, call). Keep each call tiny: the whole file runs in a few seconds.
CASES = {
    # ------------------------------------------------------------------ inner_attention
    "ia-not-tensor": (None, lambda: ia(v=[1.0])),
    "ia-dtype": (None, lambda: ia(q=t(2, 3, 5, 4).long())),
    "ia-layout": (None, lambda: ia(q=t(2, 3, 5, 4).to_sparse())),
    "ia-rank": (None, lambda: ia(k=t(3, 5, 4))),
    "ia-dtype-mismatch": (None, lambda: ia(v=t(2, 3, 5, 4, dtype=torch.float64))),
    "ia-device-mismatch": (None, lambda: ia(k=t(2, 3, 5, 4, **META))),
    "ia-k-shape": (None, lambda: ia(k=t(2, 3, 5, 3))),
    "ia-v-shape": (None, lambda: ia(v=t(2, 3, 6, 4))),
    "ia-head-dim": (None, lambda: ia(d=0)),
    "ia-scale-nonfinite": (None, lambda: ia(scale=INF)),
    "ia-scale-type": (None, lambda: ia(scale="0.5")),
    "ia-backend-unknown": (None, lambda: ia(backend="numpy")),
    "ia-backend-cpu-device": ("cpp", lambda: ia(backend="cpu", **META)),
    "ia-backend-cpu-unbuilt": ("no_cpp", lambda: ia(backend="cpu")),
    "ia-backend-cuda-unavailable": (None, lambda: ia(backend="cuda")),
    "ia-backend-triton-unavailable": (None, lambda: ia(backend="triton")),
    "ia-cuda-head-dim": ("fake_cuda", lambda: ia(backend="cuda", dv=65, **META)),
    "ia-cuda-tokens": ("fake_cuda", lambda: ia(backend="cuda", T=65, **META)),
    "ia-triton-dtype": ("interpret", lambda: ia(backend="triton", dtype=torch.float64)),
    "ia-triton-range": ("interpret", lambda: ia(backend="triton", T=65)),
    # ------------------------------------------------------------------ nested_attention
    "na-not-tensor": (None, lambda: na(q=[1.0])),
    "na-dtype": (None, lambda: na(v=t(2, 3, 5, 4).int())),
    "na-layout": (None, lambda: na(k=t(2, 3, 5, 4).to_sparse())),
    "na-rank": (None, lambda: na(q=t(1, 2, 3, 5, 4))),
    "na-dtype-mismatch": (None, lambda: na(k=t(2, 3, 5, 4, dtype=torch.float16))),
    "na-device-mismatch": (None, lambda: na(v=t(2, 3, 5, 4, **META))),
    "na-k-shape": (None, lambda: na(k=t(2, 3, 5, 3))),
    "na-v-shape": (None, lambda: na(v=t(2, 3, 4, 4))),
    "na-head-dim": (None, lambda: na(d=0)),
    "na-prev-type": (None, lambda: na(prev_logits=[[1.0]])),
    "na-prev-dtype": (None, lambda: na(prev_logits=t(2, 3, 5, 5, dtype=torch.float64))),
    "na-prev-device": (None, lambda: na(prev_logits=t(2, 3, 5, 5, **META))),
    "na-prev-rank": (None, lambda: na(prev_logits=t(2, 3, 5))),
    "na-prev-shape": (None, lambda: na(prev_logits=t(2, 3, 5, 4))),
    "na-noise-type": (None, lambda: na(noise=t(2, 3, 5, 5).numpy())),
    "na-noise-shape": (None, lambda: na(noise=t(2, 3, 5, 6))),
    "na-mlp-type": (None, lambda: na(prev_logits=t(2, 3, 5, 5), head_mlp=3)),
    "na-mlp-count": (None, lambda: na(prev_logits=t(2, 3, 5, 5), head_mlp=head_mlp()[:5])),
    "na-mlp-not-tensor": (None, lambda: na(prev_logits=t(2, 3, 5, 5), head_mlp=mlp_with(3, [0.0] * 12))),
    "na-mlp-float": (None, lambda: na(prev_logits=t(2, 3, 5, 5), head_mlp=mlp_with(0, t(12, 3).long()))),
    "na-mlp-dtype-mismatch": (None, lambda: na(prev_logits=t(2, 3, 5, 5),
                                               head_mlp=mlp_with(4, t(3, 12, dtype=torch.float64)))),
    "na-mlp-device": (None, lambda: na(prev_logits=t(2, 3, 5, 5), head_mlp=mlp_with(5, t(3, **META)))),
    "na-mlp-shape": (None, lambda: na(prev_logits=t(2, 3, 5, 5), head_mlp=mlp_with(2, t(12, 11)))),
    "na-scale-nonfinite": (None, lambda: na(scale=NAN)),
    "na-scale-type": (None, lambda: na(scale=[0.5])),
    "na-backend-unknown": (None, lambda: na(backend="numpy")),
    "na-backend-cpu-device": ("cpp", lambda: na(backend="cpu", **META)),
    "na-backend-cpu-unbuilt": ("no_cpp", lambda: na(backend="cpu")),
    "na-backend-cuda-unavailable": (None, lambda: na(backend="cuda")),
    "na-backend-triton-unavailable": (None, lambda: na(backend="triton")),
    "na-cuda-dtype": ("fake_cuda", lambda: na(backend="cuda", dtype=torch.float64, **META)),
    "na-cuda-range": ("fake_cuda", lambda: na(backend="cuda", T=65, **META)),
    "na-triton-dtype": ("interpret", lambda: na(backend="triton", dtype=torch.float64)),
    "na-triton-range": ("interpret", lambda: na(backend="triton", H=17)),
    "na-triton-shared-memory": ("interpret_a100", lambda: na(
        backend="triton", H=6, d=64, prev_logits=t(2, 6, 5, 5),
        head_mlp=[t(24, 6), t(24), t(24, 24), t(24), t(6, 24), t(6)])),
    # ------------------------------------------------------------------ hsim_split_linear (x (3, 12): H 3, d 4)
    "hs-not-tensor": (None, lambda: hs([[1.0] * 12])),
    "hs-dtype": (None, lambda: hs(t(3, 12).long())),
    "hs-layout": (None, lambda: hs(t(3, 12).to_sparse(), block_weight=t(3, 4, 4))),
    "hs-0d": (None, lambda: hs(torch.tensor(1.0))),
    "hs-empty-d": (None, lambda: hs(t(3, 0))),
    "hs-weight-type": (None, lambda: hs(mix_weight=[[[1.0]]])),
    "hs-dtype-mismatch": (None, lambda: hs(block_weight=t(3, 4, 4, dtype=torch.float64))),
    "hs-device-mismatch": (None, lambda: hs(block_weight=t(3, 4, 4), block_bias=t(3, 4, **META))),
    "hs-bias-without-weight": (None, lambda: hs(mix_bias=t(4, 3))),
    "hs-weight-rank": (None, lambda: hs(block_weight=t(3, 16))),
    "hs-bias-rank": (None, lambda: hs(mix_weight=t(4, 3, 3), mix_bias=t(12))),
    "hs-heads-mismatch": (None, lambda: hs(block_weight=t(3, 5, 5))),
    "hs-mix-shape": (None, lambda: hs(mix_weight=t(4, 3, 2))),
    "hs-mix-bias-shape": (None, lambda: hs(mix_weight=t(4, 3, 3), mix_bias=t(3, 4))),
    "hs-block-shape": (None, lambda: hs(mix_weight=t(4, 3, 3), block_weight=t(4, 3, 3))),
    "hs-block-bias-shape": (None, lambda: hs(block_weight=t(3, 4, 4), block_bias=t(4, 3))),
    "hs-backend-unknown": (None, lambda: hs(backend="numpy")),
    "hs-backend-cpu-device": ("cpp", lambda: hs(t(3, 12, **META), backend="cpu")),
    "hs-backend-cpu-unbuilt": ("no_cpp", lambda: hs(backend="cpu")),
    "hs-backend-cuda-unavailable": (None, lambda: hs(backend="cuda")),
    "hs-backend-triton-unavailable": (None, lambda: hs(backend="triton")),
    "hs-cuda-dtype": ("fake_cuda", lambda: hs(t(3, 12, dtype=torch.float64, **META),
                                              block_weight=t(3, 4, 4, dtype=torch.float64, **META), backend="cuda")),
    "hs-cuda-range": ("fake_cuda", lambda: hs(t(3, 65, **META), mix_weight=t(1, 65, 65, **META), backend="cuda")),
    "hs-triton-dtype": ("interpret", lambda: hs(t(3, 12, dtype=torch.float64),
                                                block_weight=t(3, 4, 4, dtype=torch.float64), backend="triton")),
    "hs-triton-range": ("interpret", lambda: hs(t(3, 257), block_weight=t(1, 257, 257), backend="triton")),
    # ------------------------------------------------------------------ inner_block (x (3, 5, 8), 2 heads)
    "ib-not-tensor": (None, lambda: ib([[[1.0] * 8] * 5] * 3)),
    "ib-dtype": (None, lambda: ib(t(3, 5, 8).long())),
    "ib-layout": (None, lambda: ib(t(3, 5, 8).to_sparse())),
    "ib-rank": (None, lambda: ib(t(5, 8))),
    "ib-width-zero": (None, lambda: ib(t(3, 5, 0))),
    "ib-num-heads": (None, lambda: ib(num_heads=3)),
    "ib-params-type": (None, lambda: ib(params=list(ib_params().values()))),
    "ib-fc1-weight": (None, lambda: ib(params=ib_params(**{"mlp_in.fc1.weight": t(32)}))),
    "ib-param-missing": (None, lambda: ib(params={n: p for n, p in ib_params().items() if n != "attn_in.proj.weight"})),
    "ib-param-type": (None, lambda: ib(params=ib_params(**{"norm_in.weight": [1.0] * 8}))),
    "ib-param-dtype": (None, lambda: ib(params=ib_params(**{"norm_in.bias": t(8).long()}))),
    "ib-param-shape": (None, lambda: ib(params=ib_params(**{"attn_in.v.weight": t(8, 7)}))),
    "ib-param-device": (None, lambda: ib(params=ib_params(**{"mlp_in.fc2.bias": t(8, **META)}))),
    "ib-dps-type": (None, lambda: ib(drop_path_scales=3)),
    "ib-dps-len": (None, lambda: ib(drop_path_scales=(torch.ones(3),) * 3)),
    "ib-dps-not-tensor": (None, lambda: ib(drop_path_scales=([1.0] * 3, torch.ones(3)))),
    "ib-dps-dtype": (None, lambda: ib(drop_path_scales=(torch.ones(3, dtype=torch.int64), torch.ones(3)))),
    "ib-dps-rank": (None, lambda: ib(drop_path_scales=(torch.ones(3), torch.ones(3, 1)))),
    "ib-dps-shape": (None, lambda: ib(drop_path_scales=(torch.ones(4), torch.ones(3)))),
    "ib-dps-device": (None, lambda: ib(drop_path_scales=(torch.ones(3), torch.ones(3, device="meta")))),
    "ib-eps-range": (None, lambda: ib(eps=0.0)),
    "ib-eps-type": (None, lambda: ib(eps="1e-5")),
    "ib-eps-len": (None, lambda: ib(eps=(1e-5, 1e-5, 1e-5))),
    "ib-compute-type": (None, lambda: ib(compute_dtype="float16")),
    "ib-compute-dtype": (None, lambda: ib(compute_dtype=torch.float64)),
    "ib-backend-unknown": (None, lambda: ib(backend="numpy")),
    "ib-backend-not-implemented": (None, lambda: ib(backend="cpu")),
    "ib-backend-triton-unavailable": (None, lambda: ib(backend="triton")),
    "ib-triton-dtype": ("interpret", lambda: ib(t(3, 5, 8, dtype=torch.float64), backend="triton")),
    "ib-triton-words": ("interpret", lambda: ib(t(3, 65, 8), backend="triton")),
    "ib-triton-width": ("interpret", lambda: ib(t(3, 5, 72), ib_params(72), backend="triton")),
    "ib-triton-hidden": ("interpret", lambda: ib(params=ib_params(8, hidden=65), backend="triton")),
    "ib-triton-shared-memory": ("interpret_a100", lambda: ib(t(3, 16, 40), ib_params(40), num_heads=4, backend="triton")),
    # ------------------------------------------------------------------ nn modules
    "attn-num-heads": (None, lambda: Attention(8, 8, num_heads=0)),
    "attn-dim": (None, lambda: Attention(8, -8, num_heads=2)),
    "attn-divisible": (None, lambda: Attention(8, 8, num_heads=3)),
    "attn-backend": (None, lambda: Attention(8, 8, num_heads=2, backend="numpy")),
    "attn-x-type": (None, lambda: Attention(8, 8, num_heads=2)([[1.0] * 8])),
    "attn-x-rank": (None, lambda: Attention(8, 8, num_heads=2)(t(3, 8))),
    "attn-x-width": (None, lambda: Attention(8, 8, num_heads=2)(t(2, 3, 6))),
    "nattn-num-heads": (None, lambda: NestedAttention(8, 8, num_heads=2.0)),
    "nattn-dim": (None, lambda: NestedAttention(0, 8, num_heads=2)),
    "nattn-divisible": (None, lambda: NestedAttention(8, 6, num_heads=4)),
    "nattn-backend": (None, lambda: NestedAttention(8, 8, num_heads=2, backend="numpy")),
    "nattn-x-type": (None, lambda: NestedAttention(8, 8, num_heads=2)(None)),
    "nattn-x-shape": (None, lambda: NestedAttention(8, 8, num_heads=2)(t(2, 3, 4, 8))),
    "nattn-prev-type": (None, lambda: NestedAttention(8, 8, num_heads=2)(t(2, 3, 8), [[1.0]])),
    "nattn-prev-shape": (None, lambda: NestedAttention(8, 8, num_heads=2)(t(2, 3, 8), t(2, 2, 3, 4))),
    "headmlp-num-heads": (None, lambda: HeadMlp(0)),
    "hsl-divisible": (None, lambda: HsimSplitLinear(8, 3)),
    "hsl-num-heads": (None, lambda: HsimSplitLinear(8, 0)),
    "hsl-dim": (None, lambda: HsimSplitLinear(0, 2)),
    "hsl-parts": (None, lambda: HsimSplitLinear(8, 2, parts="mix+mix")),
    "hsl-backend": (None, lambda: HsimSplitLinear(8, 2, backend="numpy")),
    "hsl-x-type": (None, lambda: HsimSplitLinear(8, 2)([1.0] * 8)),
    "hsl-x-0d": (None, lambda: HsimSplitLinear(8, 2)(torch.tensor(1.0))),
    "hsl-x-width": (None, lambda: HsimSplitLinear(8, 2)(t(3, 6))),
    "hsl-from-linear-square": (None, lambda: HsimSplitLinear.from_linear(torch.nn.Linear(8, 4), 2)),
    "hsl-from-linear-heads": (None, lambda: HsimSplitLinear.from_linear(torch.nn.Linear(8, 8), 3)),
    "hsl-from-linear-dense": (None, lambda: HsimSplitLinear.from_linear(torch.nn.Linear(8, 8), 2)),
    "droppath-range": (None, lambda: DropPath(1.0)),
    "droppath-type": (None, lambda: DropPath("0.1")),
    "tnt-dims": (None, lambda: TNTBlock(8, 16, 0, num_heads_in=2, num_heads_out=2)),
    "tnt-heads": (None, lambda: TNTBlock(8, 16, 4, num_heads_in=3, num_heads_out=2)),
    "tnt-backend": (None, lambda: TNTBlock(8, 16, 4, num_heads_in=2, num_heads_out=2, backend="numpy")),
    "tnt-input-type": (None, lambda: tnt(pixel=[[1.0]])),
    "tnt-patch-shape": (None, lambda: tnt(patch=(2, 4, 12))),
    "tnt-pixel-shape": (None, lambda: tnt(pixel=(8, 4, 8))),
    "ntnt-pixel-shape": (None, lambda: nested_tnt(pixel=(6, 5, 8))),
    "ntnt-logits-shape": (None, lambda: nested_tnt(inner_logits=t(6, 2, 3, 3))),
}

TABLE = read_table() if DOC.exists() else {}


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """No backend override, no interpreter: each setup below turns on only what its row needs."""
    monkeypatch.delenv("TNTKERNELS_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _setup(setup: str | None, monkeypatch) -> None:
    if setup == "interpret":
        if not _backend.triton_importable():
            pytest.skip("the triton package is not installed (the 'triton' backend's checks need it)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif setup == "interpret_a100":  # the interpreter, with the fit checks seeing an A100's 163 KB
        _setup("interpret", monkeypatch)
        import importlib

        for family in ("nested_attention", "inner_block"):
            monkeypatch.setattr(importlib.import_module(f"tntkernels.ops.triton.{family}"), "shared_limit_kb",
                                lambda device: 163)
    elif setup == "fake_cuda":
        monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device: None)
    elif setup == "cpp":
        if not _backend.cpp_available():
            pytest.skip(f"tntkernels._C not built: {_backend._C_ERROR}")
    elif setup == "no_cpp":
        monkeypatch.setattr(_backend, "_C", None)
    else:
        assert setup is None, setup


def test_table_matches_cases():
    assert DOC.exists(), f"{DOC} is missing"
    assert TABLE, f"no table rows found in {DOC}"
    missing, extra = sorted(set(CASES) - set(TABLE)), sorted(set(TABLE) - set(CASES))
    assert not missing and not extra, (f"rows of docs/bad-input.md without a test case: {extra}; "
                                       f"test cases without a row: {missing}")
    bad = {i: e for i, (e, _) in TABLE.items() if e not in EXCEPTIONS}
    assert not bad, f"rows must raise one of {sorted(EXCEPTIONS)}: {bad}"


@pytest.mark.parametrize("row_id", sorted(CASES))
def test_row(row_id, monkeypatch):
    assert row_id in TABLE, f"{row_id!r} has no row in docs/bad-input.md"
    exc_name, fragment = TABLE[row_id]
    setup, call = CASES[row_id]
    _setup(setup, monkeypatch)
    with pytest.raises(EXCEPTIONS[exc_name]) as info:
        call()
    assert type(info.value) is EXCEPTIONS[exc_name], f"raised {type(info.value).__name__}, documented {exc_name}"
    assert fragment in str(info.value), f"message {str(info.value)!r} lacks the documented {fragment!r}"


def test_public_ops_are_the_documented_ones():
    """Every public op of tntkernels has rows here (a new op needs its own)."""
    ops = {"inner_attention": "ia-", "nested_attention": "na-", "hsim_split_linear": "hs-", "inner_block": "ib-"}
    from tntkernels.ops import registry

    public = {n for n in tntkernels.__all__ if callable(getattr(tntkernels, n)) and not n.endswith("_ref")
              and n not in ("swap_in", "create_model", "list_models")}
    assert public == set(ops) == set(registry.OPS)
    for prefix in ops.values():
        assert any(i.startswith(prefix) for i in TABLE)

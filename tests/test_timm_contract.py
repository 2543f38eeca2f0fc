"""timm's model contract on tntkernels: timm's OWN tests (tests/test_models.py of the installed timm's
sdist) run on timm's TNT models after `tntkernels.swap_in`, and on our models registered in timm.

timm's code is not in this repository: its sdist (the only place its tests ship) is downloaded with
pip into a cache directory ($TNTKERNELS_TIMM_SDIST names a local copy instead), test_models.py is
extracted into a temporary directory, and a subprocess pytest runs it with the plugin
tests/timm_swap_plugin.py, which routes every TNT model timm's tests build through `swap_in`.

Selection: `-k` on the model names, minus TorchScript (deprecated in PyTorch; unsupported by
tntkernels, README) and the pretrained-weight downloads. For timm's TNT that is forward, backward,
the non-standard default cfgs (built on the meta device), forward_intermediates, features_only
(getter), prune_intermediate_layers and FX forward / backward: 24 tests over the three models.

Also here: unit tests of what those need (swap_in on the meta device, forward on meta, torch.fx).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import tntkernels
from tntkernels.nn import Attention, TNTBlock

timm = pytest.importorskip("timm")

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
# what the sdist run leaves out, whatever the model: TorchScript and pretrained downloads (no hub access)
EXCLUDE = "not torchscript and not pretrained"
# the tests timm selects for its TNT models (tests/test_models.py of timm 1.0.31, `-k tnt_`)
EXPECTED_TNT_TESTS = ("test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
                      "test_model_forward_intermediates_features", "test_model_forward_intermediates",
                      "test_prune_intermediate_layers_contract", "test_model_forward_fx", "test_model_backward_fx")
OUR_TIMM_NAMES = ("tntkernels_tnt_s_patch16_224", "tntkernels_tnt_b_patch16_224")
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
                  "Connection refused", "No route to host", "Max retries exceeded")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tntkernels" / "timm-sdist"


def timm_sdist() -> Path:
    """The installed timm's sdist: $TNTKERNELS_TIMM_SDIST, else the cached download, else `pip download`
    (PyPI). Skips only when pip cannot reach the index (no network); any other failure fails."""
    given = os.environ.get("TNTKERNELS_TIMM_SDIST")
    if given:
        if not Path(given).is_file():
            pytest.fail(f"TNTKERNELS_TIMM_SDIST={given} is not a file")
        return Path(given)
    version = timm.__version__
    cache = _cache_dir()
    target = cache / f"timm-{version}.tar.gz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not target.is_file():
        out = proc.stdout + proc.stderr
        if any(e in out for e in NETWORK_ERRORS):
            pytest.skip(f"no network: pip could not download timm=={version}'s sdist (timm's tests ship only "
                        f"there); set TNTKERNELS_TIMM_SDIST to a local copy. pip said: {out.strip()[-400:]}")
        pytest.fail(f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{out[-3000:]}")
    return target


@pytest.fixture(scope="module")
def timm_test_dir(tmp_path_factory) -> Path:
    """A directory holding only timm's tests/test_models.py and an empty pytest.ini (so neither our nor
    timm's pytest configuration applies, and timm's sdist package never shadows the installed timm)."""
    sdist = timm_sdist()
    out = tmp_path_factory.mktemp("timm_tests")
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py")), None)
        if member is None:
            pytest.fail(f"{sdist} has no tests/test_models.py")
        (out / "test_models.py").write_bytes(tar.extractfile(member).read())
    (out / "pytest.ini").write_text("[pytest]\n")
    return out


def run_timm_tests(test_dir: Path, keyword: str, *, swap: str = "", imports: str = "",
                   timeout: int = 1500) -> dict:
    """Run timm's test_models.py in a subprocess pytest with -k `keyword` (and EXCLUDE), the plugin
    configured to swap the timm models matching `swap` and import `imports`; returns the plugin's report
    plus the subprocess output."""
    report = test_dir / f"report-{abs(hash((keyword, swap, imports)))}.json"
    env = dict(os.environ, TNTKERNELS_TIMM_SWAP=swap, TNTKERNELS_TIMM_IMPORT=imports,
               TNTKERNELS_TIMM_REPORT=str(report),
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("GITHUB_ACTIONS", None)  # timm's file changes its selection under it
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "timm_swap_plugin", "-p", "no:cacheprovider",
           "-c", str(test_dir / "pytest.ini"), "--rootdir", str(test_dir), "-W", "ignore",
           "-k", f"({keyword}) and {EXCLUDE}", "test_models.py"]
    try:
        proc = subprocess.run(cmd, cwd=test_dir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"timm's tests ran past {timeout} s (-k {keyword!r}):\n{out[-4000:]}")
    output = proc.stdout + proc.stderr
    if not report.is_file():
        pytest.fail(f"timm's tests did not run (rc={proc.returncode}):\n{output[-4000:]}")
    result = json.loads(report.read_text())
    result["output"] = output
    result["returncode"] = proc.returncode
    print(_summary(result))  # per-test outcome and duration (pytest -rP or -s shows it)
    return result


def _summary(result: dict) -> str:
    lines = []
    for nodeid, t in result["tests"].items():
        lines.append(f"{t['outcome']:8s} {t['duration']:6.1f}s {nodeid}")
    failures = [f"--- {nodeid}\n{t['longrepr'][-2500:]}" for nodeid, t in result["tests"].items()
                if t["outcome"] in ("failed", "error")]
    return "\n".join(lines + failures)


def _check_all_passed(result: dict, min_tests: int, swapped: bool) -> None:
    tests = result["tests"]
    assert len(tests) >= min_tests, f"only {len(tests)} tests selected:\n{_summary(result)}\n{result['output'][-3000:]}"
    bad = {n: t for n, t in tests.items() if t["outcome"] != "passed"}
    assert not bad, (f"{len(bad)} of {len(tests)} of timm's tests did not pass"
                     f"{' after swap_in' if swapped else ''}:\n{_summary(result)}")
    if swapped:
        unswapped = [n for n, t in tests.items() if not t.get("swapped_builds")]
        assert not unswapped, f"tests that built no swapped model: {unswapped}"


@pytest.mark.slow
def test_timm_model_tests_pass_on_swapped_tnt(timm_test_dir):
    """timm's own tests for tnt_s / tnt_s_legacy / tnt_b, each model swapped in as timm builds it.

    All 24 (prune contract included: timm's own CI skips it as slow) take ~100 s on 2 idle cores, the
    prune contract ~50 s of it (it prunes at all 12 depths at 224²); a loaded machine is much slower."""
    result = run_timm_tests(timm_test_dir, "tnt_ and not tntkernels_", swap="tnt_*")
    selected = {n.split("::")[-1].split("[")[0] for n in result["tests"]}
    # a newer timm may add tests (they must pass too); one of these missing means the selection broke
    missing = set(EXPECTED_TNT_TESTS) - selected
    assert not missing, f"timm's tests {sorted(missing)} not selected; selected: {sorted(selected)}"
    _check_all_passed(result, min_tests=3 * len(EXPECTED_TNT_TESTS), swapped=True)


@pytest.mark.slow
def test_timm_model_tests_pass_on_registered_models(timm_test_dir):
    """timm's own tests for our TNT-S / TNT-B as registered in timm's registry (`import tntkernels.models`).

    timm picks tests by model name: our names (tntkernels_*) match neither its non-standard filter
    ('tnt_*': the default-cfg test on the meta device) nor its forward_intermediates module list, so
    those run on our models in tests/models/test_timm_api.py instead; its standard default-cfg test
    (`test_model_default_cfgs`: a spatial NCHW feature map of the cfg's pool_size) is one timm does not
    apply to its own TNT (nor to any ViT), so it is left out here too."""
    import tntkernels.models  # noqa: F401  (registers them in timm)

    missing = [n for n in OUR_TIMM_NAMES if n not in timm.list_models("tntkernels_*")]
    assert not missing, f"{missing} not registered in timm's registry by `import tntkernels.models`"
    result = run_timm_tests(timm_test_dir, "(tntkernels_tnt_s_ or tntkernels_tnt_b_) and not test_model_default_cfgs",
                            imports="tntkernels.models")
    _check_all_passed(result, min_tests=len(OUR_TIMM_NAMES) * 4, swapped=False)


# --- what those need, as unit tests (fast; no sdist) -------------------------------------------------

def _tnt_s(**kwargs):
    return timm.create_model("tnt_s_patch16_224", img_size=64, **kwargs)  # 4 × 4 patches: fast


def test_swap_in_on_meta_device_keeps_tensors_and_materialises():
    model = _tnt_s(device="meta")
    params = {n: p for n, p in model.named_parameters()}
    model, report = tntkernels.swap_in(model)
    assert report.num_blocks == 12
    after = dict(model.named_parameters())
    assert list(after) == list(params) and all(after[n] is params[n] for n in params), "tensors not moved"
    assert all(p.is_meta for p in after.values())
    # shape inference on meta, as FSDP's meta-device initialisation does
    x = torch.randn(2, 3, 64, 64, device="meta")
    assert model(x).shape == (2, 1000) and model.forward_features(x).is_meta
    # materialise: to_empty, then every module's own init
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for p in (model.cls_token, model.patch_pos, model.pixel_pos):
        torch.nn.init.trunc_normal_(p, std=0.02)
    assert not any(p.is_meta for p in model.parameters())
    y = model.eval()(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


def test_blocks_forward_on_meta_under_autocast_query():
    block = TNTBlock(24, 96, num_pixel=16, num_heads_in=4, num_heads_out=4, device="meta")
    pixel, patch = torch.empty(2 * 4, 16, 24, device="meta"), torch.empty(2, 5, 96, device="meta")
    p, q = block(pixel, patch)
    assert p.shape == pixel.shape and q.shape == patch.shape and p.is_meta and q.is_meta
    with pytest.raises(ValueError, match="pixel_embed"):
        block(torch.empty(2 * 4, 15, 24, device="meta"), patch)  # checks still run on meta


def test_symbolic_trace_matches_and_keeps_checks():
    torch.manual_seed(0)
    model, _ = tntkernels.swap_in(_tnt_s().eval())
    x = torch.randn(2, 3, 64, 64)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    targets = {getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"}
    assert {"check_block_inputs", "check_attention_input", "attention_core"} <= targets
    # the checks are in the graph: a bad input is refused by the traced module as by the eager one
    attn = torch.fx.symbolic_trace(Attention(24, 24, num_heads=4))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 24\)"):
        attn(torch.randn(2, 5, 23))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        Attention(24, 24, num_heads=4)([1.0])


@pytest.mark.parametrize("name", ["tnt_t_patch8_32", "nested_tnt_t_patch8_32", "rtnt_n_patch8_32"])
def test_symbolic_trace_of_each_model_family(name):
    """Plain torch.fx.symbolic_trace of our TNT, Nested-TNT and RTNT models: the traced module gives
    the eager logits bit for bit, and refuses a bad image as the eager one does."""
    from tntkernels.models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    c, h, w = model.input_size
    with pytest.raises(ValueError, match="expected images"):
        traced(torch.randn(2, c + 1, h, w))


def test_symbolic_trace_of_nested_attention_keeps_checks_and_noise():
    from tntkernels.nn import NestedAttention

    torch.manual_seed(0)
    attn = NestedAttention(24, 24, num_heads=4).train()  # CODA: head MLP and logit noise
    traced = torch.fx.symbolic_trace(attn)
    x, prev = torch.randn(2, 5, 24), torch.randn(2, 4, 5, 5)
    torch.manual_seed(1)
    want = attn(x, prev)
    torch.manual_seed(1)
    got = traced(x, prev)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.manual_seed(2)
    assert not torch.equal(traced(x, prev)[1], want[1]), "the noise was traced as a constant"
    with pytest.raises(ValueError, match=r"prev_logits must be \(B, H, N, N\)"):
        traced(x, torch.randn(2, 4, 5, 4))
    with pytest.raises(TypeError, match="prev_logits must be a torch.Tensor"):
        traced(x, [1.0])


def test_timm_fx_feature_extraction_keeps_our_modules_whole():
    from timm.layers import create_feature_extractor, get_graph_node_names, get_notrace_modules

    torch.manual_seed(0)
    model, _ = tntkernels.swap_in(_tnt_s().eval())
    assert {TNTBlock, Attention} <= set(get_notrace_modules())
    _, nodes = get_graph_node_names(model)  # timm's tracer: its notrace modules are leaves
    assert "blocks.3" in nodes and not any(n.startswith("blocks.3.") for n in nodes), nodes
    extractor = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(extractor(x).values())), model(x))

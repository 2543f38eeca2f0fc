"""tntkernels-train under torchrun on CPU (Gloo): 2 processes with DDP or FSDP2 take the same steps
as 1 process for the same global batch, only rank 0 writes, and a checkpoint resumes on another
number of processes. Each run is a real `python -m torch.distributed.run --standalone` launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # subprocesses; CI: the GPU machine's stack (.ci/run)

ROOT = Path(__file__).resolve().parents[1]
# 65 training examples in global batches of 16: 5 steps per epoch, the last holding 1 example, so with
# 2 processes rank 1's share of it is empty. No drop-path: its masks are drawn per process.
ARGS = ["--limit-train", "65", "--limit-test", "40", "--batch-size", "16", "--epochs", "2", "--drop-path", "0",
        "--log-every", "1"]
STEPS = 10
# measured: 2 processes vs 1 differ by ≤ 5e-7 in the step losses and ≤ 4e-6 in the weights (fp32 summation order)
TOL = 1e-4


def launch(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    prefix = [sys.executable, "-m", "tntkernels.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "tntkernels.train"]
    proc = subprocess.run(prefix + ARGS + ["--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc


def step_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model_state"]


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = step_log(a), step_log(b)
    assert [e["global_step"] for e in lb] == list(range(1, STEPS + 1))  # each step once: rank 0 alone writes
    for ea, eb in zip(la, lb):
        assert eb["loss"] == pytest.approx(ea["loss"], abs=TOL), eb["global_step"]
        assert eb["lr"] == pytest.approx(ea["lr"], rel=1e-12)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=TOL, rtol=0, msg=key)
    ma = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(mb) == len(ma) == 2
    for x, y in zip(ma, mb):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=TOL)
        assert y["test_loss"] == pytest.approx(x["test_loss"], abs=TOL)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    proc = launch(out, 1)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_take_the_same_steps_as_one(single, tmp_path, wrapper):
    proc = launch(tmp_path, 2, *(["--fsdp"] if wrapper == "fsdp" else []))
    assert proc.returncode == 0, proc.stderr
    assert f"2 processes ({'FSDP2' if wrapper == 'fsdp' else 'DDP'}, gloo)" in proc.stdout
    assert proc.stdout.count("final: ") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "steps.jsonl"]
    assert torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)["world_size"] == 2
    assert_same_run(single, tmp_path)


@pytest.mark.parametrize("first, then", [((2, "ddp"), (1, "")), ((1, ""), (2, "fsdp")), ((2, "fsdp"), (2, "ddp"))],
                         ids=["2ddp-to-1", "1-to-2fsdp", "2fsdp-to-2ddp"])
def test_resume_on_another_number_of_processes(single, tmp_path, first, then):
    flag = {"": [], "ddp": [], "fsdp": ["--fsdp"]}
    proc = launch(tmp_path, first[0], "--stop-after-steps", "3" if first[0] == 2 else "7", *flag[first[1]])
    assert proc.returncode == 0, proc.stderr
    proc = launch(tmp_path, then[0], "--resume", *flag[then[1]])
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    assert_same_run(single, tmp_path)


def test_global_batch_must_split_evenly(tmp_path):
    proc = launch(tmp_path, 2, "--batch-size", "15")
    assert proc.returncode != 0
    assert "--batch-size 15 is the global batch, split over 2 processes; expected a multiple of 2" in proc.stderr
    assert "tntkernels/train.py" not in proc.stderr  # torchrun reports the failed ranks; ours is one line

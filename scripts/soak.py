"""Soak test of tntkernels-train on CPU: a long run with stable memory and a falling loss, and a
kill -9 mid-epoch whose resumed run repeats the uninterrupted run's losses exactly.

    python scripts/soak.py                     # full: all of digits, 23 epochs = 2,070 steps (~8 min, 2 cores)
    python scripts/soak.py --limit-train 320 --epochs 6 --save-every 25    # the light version CI runs

Two runs of the same command (same seed, --log-every 1, --save-every K):
  A runs to the end; its steps.jsonl gives the loss and resident memory (RSS) of every step.
  B is sent SIGKILL mid-epoch once it has passed the kill step, then resumed with --resume; it
  continues from its last checkpoint (a --save-every one) and must log exactly A's losses (float
  equality) and end with A's weights bit for bit.
Memory: warm-up = the first --warmup-epochs epochs (2); growth = max RSS after warm-up − max RSS during it, and the
least-squares slope of RSS over the steps after warm-up (MiB per 1,000 steps).

Writes OUT/soak.json with every figure and prints it; exits 1 when a check fails:
loss (mean of the last epoch < mean of the first), memory (growth ≤ --max-growth-mb), exactness.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/soak"))
    p.add_argument("--model", default="tnt_t_patch8_32")
    p.add_argument("--epochs", type=int, default=23)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit-train", type=int, help="default: all of digits' training split")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every K steps (default 100)")
    p.add_argument("--kill-at", type=float, default=0.6, help="kill B after this fraction of the steps (default 0.6)")
    p.add_argument("--warmup-epochs", type=int, default=2,
                   help="memory warm-up: the first evaluation and checkpoint happen in it (default 2 epochs)")
    p.add_argument("--max-growth-mb", type=float, default=32.0,
                   help="largest RSS growth after warm-up that passes, MiB (default 32)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--log-every", "1", "--save-every", str(args.save_every), "--device", "cpu"]
    if args.limit_train:
        common += ["--limit-train", str(args.limit_train)]

    a_dir, b_dir = args.out / "A", args.out / "B"
    for d in (a_dir, b_dir):  # fresh runs: B's kill is timed from its own step log
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    _train(common + ["--out", str(a_dir)])
    seconds_a = time.perf_counter() - t0
    log_a = _step_log(a_dir)
    total = len(log_a)
    steps_per_epoch = total // args.epochs

    # B: killed once it is past the kill step, mid-epoch, after a --save-every checkpoint of the same epoch
    def last_checkpoint(step):
        return max(step // args.save_every * args.save_every, step // steps_per_epoch * steps_per_epoch)

    kill_step = max(1, int(args.kill_at * total))
    while kill_step < total and (kill_step % steps_per_epoch == 0 or last_checkpoint(kill_step) == kill_step
                                 or last_checkpoint(kill_step) % steps_per_epoch == 0):
        kill_step += 1
    if kill_step >= total:
        raise SystemExit(f"soak: no step after a mid-epoch checkpoint to kill at; expected --save-every "
                         f"{args.save_every} not to divide the {steps_per_epoch} steps per epoch")
    t1 = time.perf_counter()
    proc = subprocess.Popen(_command(common + ["--out", str(b_dir)]), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed_after = None
    try:
        while proc.poll() is None:
            log = _step_log(b_dir) if (b_dir / "steps.jsonl").exists() else []
            if log and log[-1]["global_step"] >= kill_step:
                os.kill(proc.pid, signal.SIGKILL)
                killed_after = log[-1]["global_step"]
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    if killed_after is None:
        raise SystemExit(f"soak: run B ended (exit {proc.returncode}) before step {kill_step}: {proc.stderr.read()}")
    ckpt = torch.load(b_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    resumed_from = ckpt["progress"]["epoch"] * steps_per_epoch + ckpt["progress"]["step"]
    t2 = time.perf_counter()
    _train(common + ["--out", str(b_dir), "--resume"])
    seconds_b = (t2 - t1, time.perf_counter() - t2)
    log_b = _step_log(b_dir)

    # figures
    losses = np.array([e["loss"] for e in log_a])
    rss = np.array([e["rss_mb"] for e in log_a])
    warm = min(args.warmup_epochs * steps_per_epoch, total - 1)
    after = np.arange(warm, total)
    slope = float(np.polyfit(after, rss[warm:], 1)[0] * 1000) if len(after) > 1 else 0.0
    growth = float(rss[warm:].max() - rss[:warm].max()) if total > warm else 0.0
    wa, wb = _weights(a_dir), _weights(b_dir)
    same_losses = [e["loss"] for e in log_b] == [e["loss"] for e in log_a]
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    first, last = float(losses[:steps_per_epoch].mean()), float(losses[-steps_per_epoch:].mean())
    summary = {
        "model": args.model, "steps": total, "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
        "seconds_run_a": round(seconds_a, 1), "seconds_run_b_until_kill": round(seconds_b[0], 1),
        "seconds_run_b_resumed": round(seconds_b[1], 1), "torch": torch.__version__, "warmup_steps": warm,
        "loss_first_epoch_mean": first, "loss_last_epoch_mean": last,
        "rss_mb_first_step": float(rss[0]), "rss_mb_warmup_max": float(rss[:warm].max()),
        "rss_mb_after_warmup_max": float(rss[warm:].max()) if total > warm else None,
        "rss_mb_final": float(rss[-1]), "rss_growth_mb": growth, "rss_slope_mb_per_1000_steps": slope,
        "kill_step": kill_step, "killed_after_step": killed_after, "resumed_from_step": resumed_from,
        "resumed_mid_epoch": resumed_from % steps_per_epoch != 0,
        "steps_logged_b": len(log_b), "identical_losses": same_losses, "identical_weights": same_weights,
    }
    checks = {
        "loss decreases": last < first,
        f"RSS growth ≤ {args.max_growth_mb} MiB": growth <= args.max_growth_mb,
        "resumed from a mid-epoch checkpoint": summary["resumed_mid_epoch"] and resumed_from <= killed_after,
        "identical losses after kill -9": same_losses and len(log_b) == total,
        "identical weights after kill -9": same_weights,
    }
    summary["checks"] = checks
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"soak: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _command(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tntkernels.train", *extra]


def _train(extra: list[str]) -> None:
    proc = subprocess.run(_command(extra), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"soak: {' '.join(extra)} exited {proc.returncode}: {proc.stderr[-2000:]}")


def _step_log(out: Path) -> list[dict]:
    entries = []
    for line in (out / "steps.jsonl").read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return entries


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model_state"]


if __name__ == "__main__":
    sys.exit(main())

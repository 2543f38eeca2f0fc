"""The training job: `tntkernels-train` / `python -m tntkernels.train`.

    tntkernels-train                          # tnt_t_patch8_32 on sklearn digits, < 2 min on 2 CPU cores
    tntkernels-train --dataset mnist --data-dir ~/data/mnist --epochs 10
    tntkernels-train --resume                 # continue runs/<model>-<dataset>/checkpoint.pt

AdamW, per-step cosine schedule after a linear warmup, label smoothing, drop-path; random
translation and horizontal flips for CIFAR-10 (opt-in elsewhere). Each epoch appends one JSON line
to DIR/metrics.jsonl and rewrites DIR/checkpoint.pt atomically; Ctrl-C finishes the current step,
saves, and exits 130.

Resuming is exact: the order of epoch e is a permutation drawn from torch.Generator seeded
seed·1000 + e, and every step reseeds the global RNGs and the augmentation generator from
(seed, epoch, step), so a run interrupted anywhere (even mid-epoch) and resumed with `--resume`
ends with the same weights and metrics, bit for bit on CPU, as a run that never stopped.

Exit codes: 0 done; 2 bad input (one line on stderr: `tntkernels-train: error: ...`); 1 a checkpoint
could not be written; 130 interrupted (checkpoint saved).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import _backend
from .data import DATASETS, DataError, load_dataset

PROG = "tntkernels-train"
CHECKPOINT_FORMAT = "tntkernels-train-checkpoint/1"

# Recipe defaults, tuned on digits (≈ 97% test accuracy in under two minutes on 2 CPU cores): in
# that short, data-poor regime small batches (more steps), label smoothing, drop-path and average
# pooling help, while random translation slows learning more than it regularizes.
# `None` on the command line means "from the checkpoint when resuming, else this".
RECIPE_DEFAULTS = {
    "data_dir": None,
    "epochs": 20,
    "batch_size": 16,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "warmup_epochs": 0.5,
    "label_smoothing": 0.1,
    "drop_path": 0.1,
    "global_pool": "avg",
    "translate": None,  # cifar10: img_size // 8 px, else 0
    "hflip": None,  # cifar10 only
    "img_size": None,  # the model's input size
    "seed": 0,
    "eval_batch_size": 256,
    "limit_train": None,
    "limit_test": None,
}
# Recipe values that fix the data order and shapes: a resumed run must not change them.
FIXED_ON_RESUME = ("img_size", "batch_size", "seed", "limit_train", "limit_test")


class UsageError(Exception):
    """Bad input; main() prints the message as one line and exits 2."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the previous one is untouched. main() exits 1."""


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad-input error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train a TNT-family model from tntkernels.models on a small image dataset.")
    p.add_argument("--model", default="tnt_t_patch8_32", help="a name from tntkernels.models.list_models()")
    p.add_argument("--dataset", default="digits", choices=DATASETS, metavar="NAME",
                   help=f"one of {', '.join(DATASETS)} (default digits: scikit-learn's 8×8 handwritten digits)")
    p.add_argument("--data-dir", help="folder holding the dataset files (mnist, cifar10, imagefolder)")
    p.add_argument("--epochs", type=int, help=f"default {RECIPE_DEFAULTS['epochs']}")
    p.add_argument("--batch-size", type=int, help=f"default {RECIPE_DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, help=f"peak learning rate, default {RECIPE_DEFAULTS['lr']}")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay, default {RECIPE_DEFAULTS['weight_decay']}")
    p.add_argument("--warmup-epochs", type=float, help=f"linear warmup, default {RECIPE_DEFAULTS['warmup_epochs']}")
    p.add_argument("--label-smoothing", type=float, help=f"default {RECIPE_DEFAULTS['label_smoothing']}")
    p.add_argument("--drop-path", type=float, help=f"stochastic depth rate, default {RECIPE_DEFAULTS['drop_path']}")
    p.add_argument("--global-pool", choices=("avg", "token"), help="classifier input: mean of the sentence tokens "
                   "(default) or the class token")
    p.add_argument("--translate", type=int, metavar="PX",
                   help="random translation by ±PX pixels (default: img_size/8 for cifar10, else 0)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="random horizontal flips (default: cifar10)")
    p.add_argument("--img-size", type=int, help="default: the model's input size")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--eval-batch-size", type=int, help=f"default {RECIPE_DEFAULTS['eval_batch_size']}")
    p.add_argument("--backend", choices=_backend.BACKENDS, help="kernels used by the model (default: best available)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<model>-<dataset>)")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from CKPT (flag alone: DIR/checkpoint.pt)")
    # testing knobs
    p.add_argument("--limit-train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--limit-test", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the training job; returns the exit code (0, 1, 2 or 130, see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except (UsageError, DataError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started (loading data, building the model): nothing to save
        print(f"\n{PROG}: interrupted before training started; nothing saved", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    from . import models

    if args.model not in models.list_models():
        raise UsageError(f"unknown model {args.model!r}; expected one of: {', '.join(models.list_models())}")

    # where, and from what
    if args.resume is not None:
        ckpt_path = Path(args.resume) if args.resume else _out_dir(args) / "checkpoint.pt"
        out = Path(args.out) if args.out else ckpt_path.parent
        ckpt = load_checkpoint(ckpt_path)
        for key in ("model", "dataset"):
            if ckpt[key] != getattr(args, key):
                raise UsageError(f"checkpoint {ckpt_path} is for {key} {ckpt[key]!r}; expected {key} "
                                 f"{getattr(args, key)!r} (pass --{key} {ckpt[key]} to resume it)")
    else:
        ckpt, out = None, _out_dir(args)
    recipe = _resolve_recipe(args, ckpt)
    device = _device(args.device)
    if args.backend is not None and (why := _backend.why_unavailable(args.backend, device)) is not None:
        raise UsageError(f"--backend {args.backend} cannot run on {device}: {why}")
    if args.workers < 0:
        raise UsageError(f"--workers must be ≥ 0, got {args.workers}")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise UsageError(f"--stop-after-steps must be ≥ 1, got {args.stop_after_steps}")

    # data and model
    if recipe["img_size"] is None:
        recipe["img_size"] = _default_img_size(models, args.model)
    train_ds, test_ds, info = load_dataset(args.dataset, recipe["data_dir"], recipe["img_size"])
    train_ds = _limit(train_ds, recipe["limit_train"])
    test_ds = _limit(test_ds, recipe["limit_test"])
    if recipe["translate"] is None:
        recipe["translate"] = recipe["img_size"] // 8 if args.dataset == "cifar10" else 0
    if recipe["hflip"] is None:
        recipe["hflip"] = args.dataset == "cifar10"

    _seed_everything(recipe["seed"])
    try:
        model = models.create_model(args.model, num_classes=info["num_classes"], in_chans=info["in_chans"],
                                    img_size=recipe["img_size"], drop_path_rate=recipe["drop_path"],
                                    global_pool=recipe["global_pool"], backend=args.backend)
    except ValueError as exc:
        raise UsageError(f"cannot build {args.model} for {args.dataset} ({info['in_chans']}×{recipe['img_size']}²,"
                         f" {info['num_classes']} classes): {_one_line(exc)}") from None
    model.to(device)
    n_train = len(train_ds)
    steps_per_epoch = math.ceil(n_train / recipe["batch_size"])
    total_steps = steps_per_epoch * recipe["epochs"]
    optimizer = torch.optim.AdamW(_param_groups(model, recipe["weight_decay"]), lr=recipe["lr"])
    warmup = min(round(recipe["warmup_epochs"] * steps_per_epoch), total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total_steps))

    progress = _fresh_progress()
    if ckpt is not None:
        _restore(ckpt, ckpt_path, model, optimizer, scheduler)
        progress = dict(ckpt["progress"])
        if progress["step"] > steps_per_epoch:
            raise UsageError(f"checkpoint {ckpt_path} stopped at step {progress['step']} of an epoch, but this data "
                             f"gives {steps_per_epoch} steps per epoch; expected the same data as when it was written")
    out.mkdir(parents=True, exist_ok=True)
    _write_history(out / "metrics.jsonl", progress["history"])

    n_params = sum(p.numel() for p in model.parameters())
    kernels = args.backend or ("compiled extension" if _backend.cpp_available() else "reference (extension not built)")
    print(f"{args.model} ({n_params / 1e6:.2f}M params, kernels: {kernels}) on {args.dataset}: "
          f"{n_train} train / {len(test_ds)} test, {info['in_chans']}×{recipe['img_size']}×{recipe['img_size']}, "
          f"{info['num_classes']} classes; device {device}; out {out}", flush=True)
    if ckpt is not None:
        print(f"resuming {ckpt_path} at epoch {progress['epoch'] + 1}, step {progress['step']}/{steps_per_epoch}",
              flush=True)
    elif (out / "checkpoint.pt").exists():
        print(f"note: starting fresh; {out / 'checkpoint.pt'} will be overwritten (use --resume to continue it)")

    run = _Run(args, recipe, info, model, optimizer, scheduler, train_ds, test_ds, device, out, progress,
               steps_per_epoch)
    return run.train()


class _Run:
    """The epoch loop and what it saves; `progress` is the part of the state that is not tensors."""

    def __init__(self, args, recipe, info, model, optimizer, scheduler, train_ds, test_ds, device, out, progress,
                 steps_per_epoch):
        self.args, self.recipe, self.info = args, recipe, info
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_ds, self.test_ds, self.device, self.out = train_ds, test_ds, device, out
        self.progress, self.steps_per_epoch = progress, steps_per_epoch
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])

    def train(self) -> int:
        p, recipe = self.progress, self.recipe
        steps_this_run = 0
        with _InterruptFlag() as interrupt:
            try:
                while p["epoch"] < recipe["epochs"]:
                    epoch = p["epoch"]
                    started = time.perf_counter() - p["seconds"]
                    seen_this_run, t_run = 0, time.perf_counter()
                    if interrupt.requested:  # Ctrl-C came during the previous epoch's evaluation or save
                        raise KeyboardInterrupt
                    desc = f"epoch {epoch + 1}/{recipe['epochs']}"
                    with tqdm(total=self.steps_per_epoch, initial=p["step"], desc=desc, leave=False,
                              dynamic_ncols=True, disable=None) as bar:
                        self.model.train()
                        for x, y in self._batches(epoch, p["step"]):
                            x, y = self._augment(x, y, epoch, p["step"])
                            p["lr"] = self.optimizer.param_groups[0]["lr"]
                            loss = _train_step(self.model, self.optimizer, self.scheduler, self.criterion, x, y)
                            p["loss_sum"] += loss * len(y)
                            p["seen"] += len(y)
                            p["step"] += 1
                            p["seconds"] = time.perf_counter() - started
                            seen_this_run += len(y)
                            steps_this_run += 1
                            bar.update(1)
                            bar.set_postfix(loss=f"{p['loss_sum'] / p['seen']:.4f}",
                                            img_s=f"{seen_this_run / (time.perf_counter() - t_run):.0f}", refresh=False)
                            if interrupt.requested:
                                raise KeyboardInterrupt
                            if steps_this_run == self.args.stop_after_steps:
                                path = self._save()
                                tqdm.write(f"stopped after {steps_this_run} steps (--stop-after-steps); "
                                           f"checkpoint: {path}")
                                return 0
                    test_loss, test_acc = self._evaluate(interrupt)
                    seconds = time.perf_counter() - started
                    train_seconds = p["seconds"]
                    metrics = {
                        "epoch": epoch + 1,
                        "train_loss": p["loss_sum"] / max(p["seen"], 1),
                        "test_loss": test_loss,
                        "test_acc": test_acc,
                        "img_per_s": p["seen"] / train_seconds if train_seconds > 0 else 0.0,
                        "lr": p["lr"],
                        "seconds": seconds,
                    }
                    p.update(_fresh_progress(), history=p["history"] + [metrics], epoch=epoch + 1,
                             best_acc=max(p["best_acc"], test_acc))
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    tqdm.write(f"epoch {epoch + 1}/{recipe['epochs']}  train_loss {metrics['train_loss']:.4f}  "
                               f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  lr {metrics['lr']:.2e}  "
                               f"{metrics['img_per_s']:.0f} img/s  {seconds:.1f}s")
                    self._save()
            except KeyboardInterrupt:
                path = self._save()
                print(f"\ninterrupted: checkpoint saved to {path} (epoch {p['epoch'] + 1}, step {p['step']}/"
                      f"{self.steps_per_epoch}); continue with --resume", file=sys.stderr)
                return 130

        history = p["history"]
        last = history[-1]
        print(f"final: model={self.args.model} dataset={self.args.dataset} epochs={len(history)} "
              f"test_acc={last['test_acc']:.4f} best_acc={p['best_acc']:.4f} "
              f"time={sum(m['seconds'] for m in history):.1f}s out={self.out}", flush=True)
        return 0

    def _batches(self, epoch: int, start_step: int):
        """The batches of `epoch` from `start_step` on: a permutation that depends only on (seed, epoch)."""
        n, bs = len(self.train_ds), self.recipe["batch_size"]
        order = torch.randperm(n, generator=_data_order_generator(self.recipe["seed"], epoch))
        index_batches = [order[i:i + bs] for i in range(start_step * bs, n, bs)]
        loader = DataLoader(_BatchView(self.train_ds), sampler=index_batches, batch_size=None,
                            num_workers=self.args.workers, pin_memory=self.device.type == "cuda",
                            worker_init_fn=_ignore_sigint if self.args.workers else None)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _augment(self, x, y, epoch: int, step: int):
        """Reseed the global RNGs (dropout, drop-path) for this step, then translate / flip."""
        seed = _step_seed(self.recipe["seed"], epoch, step)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if self.recipe["translate"] > 0:
            x = _random_translate(x, self.recipe["translate"], gen)
        if self.recipe["hflip"]:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y

    @torch.no_grad()
    def _evaluate(self, interrupt) -> tuple[float, float]:
        self.model.eval()
        x_all, y_all = self.test_ds.tensors
        loss_sum, correct = 0.0, 0
        bs = self.recipe["eval_batch_size"]
        for i in range(0, len(y_all), bs):
            x = x_all[i:i + bs].to(self.device, non_blocking=True)
            y = y_all[i:i + bs].to(self.device, non_blocking=True)
            logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            if interrupt.requested:
                raise KeyboardInterrupt
        self.model.train()
        n = max(len(y_all), 1)
        return loss_sum / n, correct / n

    def _save(self) -> Path:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.args.model,
            "dataset": self.args.dataset,
            "args": {k: v for k, v in vars(self.args).items()},
            "recipe": dict(self.recipe),
            "model_state": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.progress["epoch"],
            "step": self.progress["step"],
            "progress": dict(self.progress),
            "rng": _rng_state(),
            "data_order": {"seed": _data_order_seed(self.recipe["seed"], self.progress["epoch"]),
                           "generator": _data_order_generator(self.recipe["seed"], self.progress["epoch"]).get_state()},
        }
        path = self.out / "checkpoint.pt"
        save_checkpoint(state, path)
        return path


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------

def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace: a crash or an error
    mid-write leaves the previous checkpoint as it was.

    Raises:
        CheckpointWriteError: the write failed (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same folder: same filesystem
    try:
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, Exception):
            raise CheckpointWriteError(f"could not write checkpoint {path} ({type(exc).__name__}: "
                                       f"{_one_line(exc)}); the previous checkpoint is unchanged") from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint written by `save_checkpoint` (tensors only: weights_only=True).

    Raises:
        UsageError: the file is missing, truncated, corrupt, or not a tntkernels-train checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; expected a checkpoint.pt written by {PROG} "
                         "(drop --resume to start fresh)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage, foreign pickle, ...
        raise UsageError(f"cannot load checkpoint {path} ({type(exc).__name__}: {_one_line(exc)}); expected a "
                         f"complete checkpoint written by {PROG}") from None
    required = ("model", "dataset", "recipe", "model_state", "optimizer", "scheduler", "progress", "rng")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in required):
        raise UsageError(f"{path} is not a {PROG} checkpoint; expected a dict with format {CHECKPOINT_FORMAT!r}")
    return ckpt


def _restore(ckpt: dict, path: Path, model, optimizer, scheduler) -> None:
    try:
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"checkpoint {path} does not fit {ckpt['model']} as built now ({_one_line(exc)}); "
                         "expected the same model, dataset and recipe") from None


def _resolve_recipe(args, ckpt: dict | None) -> dict:
    """Command line > checkpoint > RECIPE_DEFAULTS, then validate."""
    saved = ckpt["recipe"] if ckpt is not None else {}
    recipe = {}
    for key, default in RECIPE_DEFAULTS.items():
        given = getattr(args, key)
        if given is not None and key in FIXED_ON_RESUME and key in saved and saved[key] != given:
            raise UsageError(f"--{key.replace('_', '-')} {given} differs from the checkpoint's {saved[key]}; "
                             "expected the same value to resume (or drop the option)")
        recipe[key] = given if given is not None else saved.get(key, default)

    def check(ok, what):
        if not ok:
            raise UsageError(what)

    check(recipe["epochs"] >= 1, f"--epochs must be ≥ 1, got {recipe['epochs']}")
    check(recipe["batch_size"] >= 1, f"--batch-size must be ≥ 1, got {recipe['batch_size']}")
    check(recipe["eval_batch_size"] >= 1, f"--eval-batch-size must be ≥ 1, got {recipe['eval_batch_size']}")
    check(recipe["lr"] > 0 and math.isfinite(recipe["lr"]), f"--lr must be > 0, got {recipe['lr']}")
    check(recipe["weight_decay"] >= 0, f"--weight-decay must be ≥ 0, got {recipe['weight_decay']}")
    check(recipe["warmup_epochs"] >= 0, f"--warmup-epochs must be ≥ 0, got {recipe['warmup_epochs']}")
    check(0 <= recipe["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1), got {recipe['label_smoothing']}")
    check(0 <= recipe["drop_path"] < 1, f"--drop-path must be in [0, 1), got {recipe['drop_path']}")
    check(recipe["translate"] is None or recipe["translate"] >= 0,
          f"--translate must be ≥ 0, got {recipe['translate']}")
    check(recipe["img_size"] is None or recipe["img_size"] >= 1, f"--img-size must be ≥ 1, got {recipe['img_size']}")
    for key in ("limit_train", "limit_test"):
        check(recipe[key] is None or recipe[key] >= 1, f"--{key.replace('_', '-')} must be ≥ 1, got {recipe[key]}")
    return recipe


def _fresh_progress() -> dict:
    """Progress within an epoch (reset at every epoch end) plus what spans epochs."""
    return {"epoch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0, "lr": 0.0,
            "best_acc": 0.0, "history": []}


def _write_history(path: Path, history: list[dict]) -> None:
    """metrics.jsonl = the checkpoint's epochs (drops lines of epochs the checkpoint never saw)."""
    with open(path, "w") as f:
        for metrics in history:
            f.write(json.dumps(metrics) + "\n")


# ---------------------------------------------------------------------------------------------
# Randomness: everything that varies between steps is derived from (seed, epoch, step).
# ---------------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _data_order_seed(seed: int, epoch: int) -> int:
    return seed * 1000 + epoch


def _data_order_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(_data_order_seed(seed, epoch))


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return int(np.random.SeedSequence([seed % 2 ** 32, epoch, step]).generate_state(1)[0])


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------
# Pieces of a step.
# ---------------------------------------------------------------------------------------------

def _train_step(model, optimizer, scheduler, criterion, x, y) -> float:
    loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and class tokens."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip or name.endswith(("pos", "token")) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _random_translate(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own (dy, dx) in [-max_shift, max_shift]², padding by edge replication."""
    B, C, H, W = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (2, B), generator=gen).to(x.device)  # (2, B)
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    rows = (max_shift + shift[0])[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = (max_shift + shift[1])[:, None] + torch.arange(W, device=x.device)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


class _BatchView(torch.utils.data.Dataset):
    """dataset[index tensor] -> the whole batch, so a DataLoader with batch_size=None slices tensors."""

    def __init__(self, ds):
        self.tensors = ds.tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops them when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _InterruptFlag:
    """While active, the first Ctrl-C only sets `requested` (the loop stops at the next step
    boundary, with the model and optimizer consistent); a second one interrupts at once."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{PROG}: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ---------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------

def _out_dir(args) -> Path:
    return Path(args.out) if args.out else Path("runs") / f"{args.model}-{args.dataset}"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; expected --device cpu or auto")
    return torch.device(name)


def _default_img_size(models, name: str) -> int:
    """The model's input size from its pretrained_cfg, built on the meta device when possible."""
    try:
        with torch.device("meta"):
            probe = models.create_model(name)
    except Exception:  # some constructors need real tensors; build it for real then
        probe = models.create_model(name)
    return int(probe.pretrained_cfg["input_size"][-1])


def _limit(ds, n: int | None):
    """The first n examples of a fixed (seed 0) shuffle, so every class stays represented."""
    if n is None or n >= len(ds):
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return torch.utils.data.TensorDataset(*(t[keep] for t in ds.tensors))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

"""The training job: `tntkernels-train` / `python -m tntkernels.train`.

    tntkernels-train                          # tnt_t_patch8_32 on sklearn digits, < 2 min on 2 CPU cores
    tntkernels-train --dataset mnist --data-dir ~/data/mnist --epochs 10
    tntkernels-train --resume                 # continue runs/<model>-<dataset>/checkpoint.pt
    torchrun --nproc_per_node 2 -m tntkernels.train --batch-size 32   # DDP (Gloo on CPU, NCCL on GPUs)
    torchrun --nproc_per_node 8 -m tntkernels.train --model tnt_b_patch16_224 --fsdp ...     # FSDP2

AdamW, per-step cosine schedule after a linear warmup, label smoothing, drop-path; random
translation and horizontal flips for CIFAR-10 (opt-in elsewhere). Image folders are streamed from
disk through timm's transforms (tntkernels/streaming.py) with the TNT paper's DeiT augmentation
(RandAugment, mixup, cutmix, random erasing, random-resized crops) by default for 224² models.
Each epoch appends one JSON line to DIR/metrics.jsonl and rewrites DIR/checkpoint.pt atomically;
Ctrl-C finishes the current step, saves, and exits 130.

Distributed: under torchrun each process trains on its share of every global batch (--batch-size is
the global batch; each of the N processes gets batch_size / N examples, drawn by a DistributedSampler
from the same permutation as a single process uses), gradients are averaged by
DistributedDataParallel, or reduce-scattered by FSDP2 (`fully_shard` per block) with --fsdp. The loss
is normalised by the global batch, so N processes take the same steps as one (up to floating-point
summation order). Only rank 0 writes metrics, step logs and checkpoints; checkpoints hold full
(unsharded) tensors, so a run resumes on any number of processes, with or without --fsdp. Random
streams (dropout, drop-path, augmentation) are per process, so runs on different process counts
agree in distribution, not bit for bit, unless those are off.

Resuming is exact: the order of epoch e is a permutation drawn from torch.Generator seeded
seed·1000 + e, and every step reseeds the global RNGs and the augmentation generator from
(seed, epoch, step) (a streamed image's transform from (seed, epoch, step, position in the batch),
in whichever worker decodes it), so a run interrupted anywhere (even mid-epoch) and resumed with
`--resume` ends with the same weights and metrics, bit for bit on CPU, as a run that never stopped
(and, for streamed folders, whatever --workers each part used).

Options a timm user expects: --amp bf16|fp16 (torch.autocast on the run's device; fp16 adds a
GradScaler, checkpointed), --compile (torch.compile of the training net; evaluation and checkpoints
use the plain module), --model-ema [--model-ema-decay D] (timm's ModelEmaV3, checkpointed; each epoch
also reports ema_test_acc), --clip-grad NORM (global gradient norm). All but --compile are part of
the recipe: a resumed run keeps them unless given again (--compile must be given again). Each
epoch's metrics include img_per_s and peak_mem_mb (CUDA: max allocated; CPU: peak resident set),
both over the epoch's training steps.

--save-every K also checkpoints every K steps within an epoch (a kill -9 then loses at most K steps);
--log-every K appends {global_step, epoch, step, loss, lr, rss_mb} to DIR/steps.jsonl every K steps
(trimmed back to the checkpoint on resume, so a resumed run's log equals an uninterrupted one's).

Exit codes: 0 done; 2 bad input (one line on stderr: `tntkernels-train: error: ...`); 1 a checkpoint
could not be written; 130 interrupted by Ctrl-C or SIGTERM (checkpoint saved).
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
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
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
    "amp": "off",
    "clip_grad": 0.0,  # 0 = no clipping
    "model_ema": False,
    "model_ema_decay": 0.9998,  # timm's train.py default
    # Augmentation. `None` = per recipe: the TNT paper's DeiT recipe for models whose input is
    # ≥ 224² (RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25, random-resized crops and
    # flips), off for the small 32² models (the digits recipe above). aa, reprob and rrc are PIL /
    # tensor transforms of streamed image folders (--dataset imagefolder); mixup and cutmix mix
    # batches of any dataset.
    "aa": None,
    "mixup": None,
    "cutmix": None,
    "reprob": None,
    "rrc": None,
}
DEIT_RECIPE = {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "rrc": True, "hflip": True}
SMALL_RECIPE = {"aa": "none", "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "rrc": False}
STREAM_ONLY = ("aa", "reprob", "rrc")  # transforms of decoded images: streamed folders only
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
    p.add_argument("--aa", metavar="POLICY", help="imagefolder: timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 "
                   "(RandAugment), or none (default: rand-m9-mstd0.5-inc1 for 224² models, else none)")
    p.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup alpha, 0 = off (default 0.8 for 224² models, "
                   "else 0); with mixup or cutmix the loss is soft-target cross-entropy")
    p.add_argument("--cutmix", type=float, metavar="ALPHA", help="cutmix alpha, 0 = off (default 1.0 for 224² models, "
                   "else 0)")
    p.add_argument("--reprob", type=float, metavar="P", help="imagefolder: random erasing probability (default 0.25 "
                   "for 224² models, else 0)")
    p.add_argument("--rrc", action=argparse.BooleanOptionalAction,
                   help="imagefolder: timm's random-resized crops (default: 224² models); without, the whole image "
                        "is resized")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--eval-batch-size", type=int, help=f"default {RECIPE_DEFAULTS['eval_batch_size']}")
    p.add_argument("--pretrained", nargs="?", const="", metavar="FILE",
                   help="start from pretrained weights, loaded through timm: FILE (.safetensors or a torch.save'd "
                        "state_dict, e.g. timm's tnt_s_patch16_224 weights), or without FILE the model's released "
                        "weights from timm's cache / the Hugging Face hub (TNT-S, TNT-B). A head of another class "
                        "count is re-initialised; other input channels adapt the first conv")
    p.add_argument("--backend", choices=_backend.BACKENDS, help="kernels used by the model (default: best available)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    p.add_argument("--workers", type=int,
                   help="DataLoader worker processes (default: 0 for the in-memory datasets digits, mnist and "
                        "cifar10; for imagefolder, read from disk, min(8, CPU cores / processes on this node))")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<model>-<dataset>)")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from CKPT (flag alone: DIR/checkpoint.pt)")
    p.add_argument("--save-every", type=int, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps within an epoch (default: at epoch ends only)")
    p.add_argument("--log-every", type=int, metavar="STEPS",
                   help="append the loss, learning rate and resident memory to DIR/steps.jsonl every STEPS steps")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"),
                   help="mixed precision: torch.autocast to bfloat16 or float16 on the run's device (fp16 with a "
                        "gradient scaler, saved in checkpoints); default off")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward/backward (checkpoints keep the plain module's keys)")
    p.add_argument("--model-ema", action=argparse.BooleanOptionalAction,
                   help="keep an exponential moving average of the weights (timm's ModelEmaV3; needs timm), saved "
                        "in checkpoints and evaluated each epoch (ema_test_acc)")
    p.add_argument("--model-ema-decay", type=float, metavar="DECAY",
                   help=f"EMA decay per step, default {RECIPE_DEFAULTS['model_ema_decay']}")
    p.add_argument("--clip-grad", type=float, metavar="NORM",
                   help="clip the global gradient norm to NORM (clip_grad_norm_); default 0 = off")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard per "
                        "block) instead of replicating them with DDP")
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
    group = ProcessGroup()
    try:
        return _run(args, group)
    except (UsageError, DataError) as exc:
        print(f"{PROG}: error: {group.tag}{_one_line(exc)}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:
        print(f"{PROG}: error: {group.tag}{_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started (loading data, building the model): nothing to save
        print(f"\n{PROG}: {group.tag}interrupted before training started; nothing saved", file=sys.stderr)
        return 130
    finally:
        group.close()


class ProcessGroup:
    """torchrun's processes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment), or one.

    `start(device)` joins the default process group (NCCL for CUDA devices, Gloo for CPU) unless one
    is already initialized; `all_sum` adds small float64 vectors over the ranks (identity alone).
    """

    def __init__(self):
        env = os.environ
        self.launched = all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))
        self.rank = int(env["RANK"]) if self.launched else 0
        self.world = int(env["WORLD_SIZE"]) if self.launched else 1
        self.local_rank = int(env["LOCAL_RANK"]) if self.launched else 0
        self.device = torch.device("cpu")
        self._owned = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""

    def start(self, device: torch.device) -> None:
        self.device = device
        if not self.launched or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self._owned = True

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        self._owned = False


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def _run(args: argparse.Namespace, group: ProcessGroup) -> int:
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
    device = _device(args.device, group)
    if args.backend is not None and (why := _backend.why_unavailable(args.backend, device)) is not None:
        raise UsageError(f"--backend {args.backend} cannot run on {device}: {why}")
    if args.workers is None:
        args.workers = _default_workers(args.dataset)
    if args.workers < 0:
        raise UsageError(f"--workers must be ≥ 0, got {args.workers}")
    _check_amp(recipe["amp"], device)
    if recipe["model_ema"]:
        if args.fsdp:
            raise UsageError("--model-ema keeps a full copy of the weights per process, which --fsdp shards; "
                             "expected one of the two (--no-model-ema when resuming a checkpoint that used it)")
        _model_ema_class()  # fail now, not after loading the data, when timm is missing
    for flag in ("stop_after_steps", "save_every", "log_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if recipe["batch_size"] % group.world:
        raise UsageError(f"--batch-size {recipe['batch_size']} is the global batch, split over {group.world} "
                         f"processes; expected a multiple of {group.world}")
    if args.fsdp and not group.launched:
        raise UsageError("--fsdp shards the model over torchrun's processes; expected a launch by "
                         "torchrun --nproc_per_node N")
    group.start(device)

    # data and model
    model_img_size = _default_img_size(models, args.model)
    if recipe["img_size"] is None:
        recipe["img_size"] = model_img_size
    deit = model_img_size >= 224  # the TNT paper's ImageNet recipe; the small models keep the digits one
    _resolve_augmentation(recipe, args, deit)
    streaming = args.dataset == "imagefolder"
    if streaming:  # file lists: images are decoded per batch (see tntkernels/streaming.py)
        from .streaming import open_imagefolder

        train_ds, test_ds, info = open_imagefolder(recipe["data_dir"])
        info["img_size"] = recipe["img_size"]
    else:
        train_ds, test_ds, info = load_dataset(args.dataset, recipe["data_dir"], recipe["img_size"])
    train_ds = _limit(train_ds, recipe["limit_train"])
    test_ds = _limit(test_ds, recipe["limit_test"])
    if recipe["translate"] is None:
        recipe["translate"] = recipe["img_size"] // 8 if args.dataset == "cifar10" else 0
    if recipe["hflip"] is None:
        recipe["hflip"] = args.dataset == "cifar10" or (streaming and deit)

    _seed_everything(recipe["seed"])
    # a resumed run takes its weights from the checkpoint: --pretrained would only fetch weights to overwrite
    pretrained = args.pretrained is not None and ckpt is None
    try:
        model = models.create_model(args.model, num_classes=info["num_classes"], in_chans=info["in_chans"],
                                    img_size=recipe["img_size"], drop_path_rate=recipe["drop_path"],
                                    global_pool=recipe["global_pool"], backend=args.backend, pretrained=pretrained,
                                    pretrained_cfg_overlay=dict(file=args.pretrained) if pretrained and args.pretrained
                                    else None)
    except (ValueError, ImportError, models.PretrainedError) as exc:
        if pretrained and args.pretrained and _is_train_checkpoint(args.pretrained):
            raise UsageError(f"--pretrained {args.pretrained} is a tntkernels-train checkpoint, not a weights file; "
                             "expected --resume to continue that run, or a state_dict file (e.g. torch.save(torch.load"
                             "(CKPT)['model_state'], 'weights.pth'))") from None
        raise UsageError(f"cannot build {args.model} for {args.dataset} ({info['in_chans']}×{recipe['img_size']}²,"
                         f" {info['num_classes']} classes): {_one_line(exc)}") from None
    if streaming:  # timm's transforms for this model's pretrained_cfg (input size, mean, std, interpolation, crop)
        from .streaming import set_transforms

        cfg = set_transforms(train_ds, test_ds, model.pretrained_cfg, recipe["img_size"], info["in_chans"],
                             aa=None if recipe["aa"] == "none" else recipe["aa"], reprob=recipe["reprob"],
                             rrc=recipe["rrc"], hflip=recipe["hflip"])
        info["mean"], info["std"] = cfg["mean"], cfg["std"]
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = len(train_ds)
    steps_per_epoch = math.ceil(n_train / recipe["batch_size"])
    total_steps = steps_per_epoch * recipe["epochs"]
    progress = _fresh_progress()
    if ckpt is not None:
        _restore(ckpt_path, lambda: model.load_state_dict(ckpt["model_state"]), ckpt["model"])
        progress = dict(ckpt["progress"])
        if progress["step"] > steps_per_epoch:
            raise UsageError(f"checkpoint {ckpt_path} stopped at step {progress['step']} of an epoch, but this data "
                             f"gives {steps_per_epoch} steps per epoch; expected the same data as when it was written")

    # the EMA copies the plain module (before any wrapper) with the weights it starts from
    ema, ema_note = None, None
    if recipe["model_ema"]:
        ema = _model_ema_class()(model, decay=recipe["model_ema_decay"])
        if ckpt is not None and "ema_state" in ckpt:
            _restore(ckpt_path, lambda: ema.module.load_state_dict(ckpt["ema_state"]), ckpt["model"])
        elif ckpt is not None:
            ema_note = "note: the checkpoint has no EMA weights; the EMA starts from its weights"

    # replicate (DDP) or shard (FSDP2) over torchrun's processes; the optimizer sees the final parameters
    net = model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        fully_shard(model)  # in place: `model` now all-gathers its blocks' parameters in forward
    elif group.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.compile:
        # after the DDP/FSDP wrapper (PyTorch's advice: Dynamo then splits the graph at DDP's buckets); `model`
        # stays the plain module, so evaluation runs eagerly and checkpoints never see `_orig_mod.` keys
        net = torch.compile(net)
    scaler = None
    if recipe["amp"] == "fp16":  # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        if args.fsdp:  # all-reduces "found inf" so that every rank skips the same steps
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(device.type)
            # its one-element found-inf tensors meet DTensor gradients: torch warns on every step
            warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1", category=UserWarning)
        else:
            scaler = torch.amp.GradScaler(device.type)
    groups, names = _param_groups(model, recipe["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=recipe["lr"])
    warmup = min(round(recipe["warmup_epochs"] * steps_per_epoch), total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total_steps))
    if ckpt is not None:
        def load_rest():
            if args.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(ckpt["optimizer"], names),
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])

        _restore(ckpt_path, load_rest, ckpt["model"])

    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_history(out / "metrics.jsonl", progress["history"])
        if args.log_every is not None:
            _trim_step_log(out / "steps.jsonl", progress["epoch"] * steps_per_epoch + progress["step"])
        kernels = args.backend or ("compiled extension" if _backend.cpp_available()
                                   else "reference (extension not built)")
        where = f"device {device}" if group.world == 1 else (
            f"{group.world} processes ({'FSDP2' if args.fsdp else 'DDP'}, {dist.get_backend()}), device {device.type}")
        print(f"{args.model} ({n_params / 1e6:.2f}M params, kernels: {kernels}) on {args.dataset}: "
              f"{n_train} train / {len(test_ds)} test, {info['in_chans']}×{recipe['img_size']}×{recipe['img_size']}, "
              f"{info['num_classes']} classes; {where}; out {out}", flush=True)
        if ckpt is not None:
            print(f"resuming {ckpt_path} at epoch {progress['epoch'] + 1}, step {progress['step']}/{steps_per_epoch}",
                  flush=True)
            if ema_note is not None:
                print(ema_note, flush=True)
        elif (out / "checkpoint.pt").exists():
            print(f"note: starting fresh; {out / 'checkpoint.pt'} will be overwritten (use --resume to continue it)")

    run = _Run(args, recipe, info, model, net, optimizer, scheduler, names, train_ds, test_ds, group, out,
               progress, steps_per_epoch, ema=ema, scaler=scaler)
    return run.train()


class _Run:
    """The epoch loop and what it saves; `progress` is the part of the state that is not tensors.

    `model` is the module (sharded in place under FSDP2), `net` what a training step calls (the DDP
    wrapper under DDP, else `model`; compiled with --compile). Under torchrun every rank runs the same
    steps; `progress` is the same on every rank (its sums are all-reduced each step). `ema` is timm's
    ModelEmaV3 of `model` (--model-ema) or None, `scaler` the fp16 GradScaler (--amp fp16) or None.
    """

    def __init__(self, args, recipe, info, model, net, optimizer, scheduler, param_names, train_ds, test_ds, group,
                 out, progress, steps_per_epoch, ema=None, scaler=None):
        self.args, self.recipe, self.info = args, recipe, info
        self.model, self.net, self.optimizer, self.scheduler = model, net, optimizer, scheduler
        self.param_names = param_names
        self.train_ds, self.test_ds, self.group, self.device = train_ds, test_ds, group, group.device
        self.out, self.progress, self.steps_per_epoch = out, progress, steps_per_epoch
        self.ema, self.scaler = ema, scaler
        # summed over the local batch; a step scales it by world / global batch (see _train_step)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"], reduction="sum")
        self.mixup = None
        if recipe["mixup"] > 0 or recipe["cutmix"] > 0:
            try:
                from timm.data import Mixup
            except ImportError:
                raise UsageError("--mixup / --cutmix use timm's Mixup; expected timm to be installed (pip install "
                                 "'timm>=1.0'), or --mixup 0 --cutmix 0") from None
            # timm's Mixup makes the (label-smoothed) soft targets. The loss is timm's SoftTargetCrossEntropy
            # as a sum over the batch, not its mean: under DDP a rank's share of the last batch can be empty
            # (a mean over nothing is NaN, which the all-reduced loss would spread)
            self.mixup = Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"],
                               label_smoothing=recipe["label_smoothing"], num_classes=info["num_classes"])
            self.criterion = soft_target_cross_entropy_sum
        self.streaming = args.dataset == "imagefolder"
        self._train_loader = self._test_loader = None
        self.step_log = None

    def train(self) -> int:
        p, recipe, group = self.progress, self.recipe, self.group
        steps_this_run = 0
        if self.args.log_every is not None and group.is_main:
            self.step_log = open(self.out / "steps.jsonl", "a", buffering=1)
        with _InterruptFlag(quiet=not group.is_main) as interrupt, (self.step_log or contextlib.nullcontext()):
            try:
                while p["epoch"] < recipe["epochs"]:
                    epoch = p["epoch"]
                    started = time.perf_counter() - p["seconds"]
                    seen_this_run, t_run = 0, time.perf_counter()
                    _reset_peak_memory(self.device)
                    if self._any(interrupt.requested):  # Ctrl-C came during the previous evaluation or save
                        raise KeyboardInterrupt
                    desc = f"epoch {epoch + 1}/{recipe['epochs']}"
                    with tqdm(total=self.steps_per_epoch, initial=p["step"], desc=desc, leave=False,
                              dynamic_ncols=True, disable=None if group.is_main else True) as bar:
                        self.net.train()
                        for x, y, n_global in self._batches(epoch, p["step"]):
                            x, y = self._augment(x, y, epoch, p["step"])
                            p["lr"] = self.optimizer.param_groups[0]["lr"]
                            loss_sum = _train_step(self.net, self.optimizer, self.scheduler, self.criterion, x, y,
                                                   group.world / n_global, recipe["amp"], self.scaler,
                                                   recipe["clip_grad"])
                            if self.ema is not None:  # step = optimizer updates so far: the first one copies
                                self.ema.update(self.model, step=epoch * self.steps_per_epoch + p["step"] + 1)
                            # one all-reduce per step: the global loss sum, the global count, any stop request
                            loss_sum, seen, stop = group.all_sum([loss_sum, len(y), interrupt.requested])
                            p["loss_sum"] += loss_sum
                            p["seen"] += int(seen)
                            p["step"] += 1
                            p["seconds"] = time.perf_counter() - started
                            seen_this_run += int(seen)
                            steps_this_run += 1
                            global_step = epoch * self.steps_per_epoch + p["step"]
                            bar.update(1)
                            bar.set_postfix(loss=f"{p['loss_sum'] / p['seen']:.4f}",
                                            img_s=f"{seen_this_run / (time.perf_counter() - t_run):.0f}", refresh=False)
                            if self.step_log is not None and global_step % self.args.log_every == 0:
                                self.step_log.write(json.dumps({
                                    "global_step": global_step, "epoch": epoch, "step": p["step"],
                                    "loss": loss_sum / seen, "lr": p["lr"], "rss_mb": _rss_mb()}) + "\n")
                            if stop:
                                raise KeyboardInterrupt
                            if steps_this_run == self.args.stop_after_steps:
                                path = self._save()
                                if group.is_main:
                                    tqdm.write(f"stopped after {steps_this_run} steps (--stop-after-steps); "
                                               f"checkpoint: {path}")
                                return 0
                            if self.args.save_every is not None and global_step % self.args.save_every == 0:
                                self._save()
                    peak_mb = _peak_memory_mb(self.device)  # of this epoch's training steps (this process)
                    test_loss, test_acc = self._evaluate(interrupt, self.model)
                    ema_metrics = {}
                    if self.ema is not None:
                        ema_loss, ema_acc = self._evaluate(interrupt, self.ema.module)
                        ema_metrics = {"ema_test_loss": ema_loss, "ema_test_acc": ema_acc}
                    seconds = time.perf_counter() - started
                    train_seconds = p["seconds"]
                    metrics = {
                        "epoch": epoch + 1,
                        "train_loss": p["loss_sum"] / max(p["seen"], 1),
                        "test_loss": test_loss,
                        "test_acc": test_acc,
                        **ema_metrics,
                        # images over the epoch's training steps (all ranks), data loading included
                        "img_per_s": p["seen"] / train_seconds if train_seconds > 0 else 0.0,
                        "peak_mem_mb": peak_mb,
                        "lr": p["lr"],
                        "seconds": seconds,
                    }
                    p.update(_fresh_progress(), history=p["history"] + [metrics], epoch=epoch + 1,
                             best_acc=max(p["best_acc"], test_acc))
                    if group.is_main:
                        with open(self.out / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(metrics) + "\n")
                        ema_text = f"ema_test_acc {ema_metrics['ema_test_acc']:.4f}  " if ema_metrics else ""
                        tqdm.write(f"epoch {epoch + 1}/{recipe['epochs']}  train_loss {metrics['train_loss']:.4f}  "
                                   f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  {ema_text}"
                                   f"lr {metrics['lr']:.2e}  {metrics['img_per_s']:.0f} img/s  "
                                   f"peak {peak_mb:.0f} MiB {_PEAK_MEMORY_KIND[self.device.type]}  {seconds:.1f}s")
                    self._save()
            except KeyboardInterrupt:
                path = self._save()
                if group.is_main:
                    print(f"\ninterrupted: checkpoint saved to {path} (epoch {p['epoch'] + 1}, step {p['step']}/"
                          f"{self.steps_per_epoch}); continue with --resume", file=sys.stderr)
                return 130

        history = p["history"]
        last = history[-1]
        if group.is_main:
            print(f"final: model={self.args.model} dataset={self.args.dataset} epochs={len(history)} "
                  f"test_acc={last['test_acc']:.4f} best_acc={p['best_acc']:.4f} "
                  f"time={sum(m['seconds'] for m in history):.1f}s out={self.out}", flush=True)
        return 0

    def _any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (the ranks must stop at the same step)."""
        return self.group.all_sum([flag])[0] > 0 if self.group.world > 1 else flag

    def _batches(self, epoch: int, start_step: int):
        """This rank's share of the batches of `epoch` from `start_step` on, with each global batch's size.

        The epoch's order is a permutation that depends only on (seed, epoch): DistributedSampler's,
        seeded seed·1000 + epoch (with one process, exactly the order of earlier versions). Global
        batch i is positions [i·B, (i+1)·B) of it; rank r takes the positions ≡ r (mod world) of it,
        which are DistributedSampler's indices [i·B/world, (i+1)·B/world) for rank r. The padding
        DistributedSampler appends to even out the ranks is dropped, so the last global batch holds
        each example once (a rank's share may then be smaller, even empty).
        """
        n, bs, world, rank = len(self.train_ds), self.recipe["batch_size"], self.group.world, self.group.rank
        sampler = DistributedSampler(self.train_ds, num_replicas=world, rank=rank, shuffle=True,
                                     seed=_data_order_seed(self.recipe["seed"], 0), drop_last=False)
        sampler.set_epoch(epoch)
        local = torch.tensor(list(sampler), dtype=torch.long)[:len(range(rank, n, world))]  # without the padding
        per_rank = bs // world
        steps = range(start_step, self.steps_per_epoch)
        index_batches = [local[i * per_rank:(i + 1) * per_rank] for i in steps]
        if self.streaming:
            # items (index, step seed, position): each image's augmentation is seeded by where it sits
            seed = self.recipe["seed"]

            def items(i, b):
                step_seed = _step_seed(seed, epoch, i, rank)
                return [(j, step_seed, k) for k, j in enumerate(b.tolist())]

            batches = self._stream(self.train_ds, "_train_loader", list(zip(steps, index_batches)), items)
        else:
            batches = DataLoader(_BatchView(self.train_ds), sampler=index_batches, batch_size=None,
                                 num_workers=self.args.workers, pin_memory=self.device.type == "cuda",
                                 worker_init_fn=_ignore_sigint if self.args.workers else None)
        for i, (x, y) in zip(steps, batches):
            n_global = min(bs, n - i * bs)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), n_global

    def _stream(self, ds, attr: str, batches: list[tuple[int, torch.Tensor]], items=None):
        """Decode `batches` ((step, index tensor) pairs) of a streamed folder with the DataLoader kept in
        self.<attr> (one per split, so --workers processes persist across epochs; only its list of
        batches changes, and the main process draws from it). `items(step, indices)` makes a batch's
        dataset items when the loader asks for it (default: the indices). Empty batches (a rank's
        share of the last batch) yield empty tensors without a worker."""
        loader = getattr(self, attr)
        if loader is None:
            workers = self.args.workers
            loader = DataLoader(ds, batch_sampler=_BatchList(), num_workers=workers,
                                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                worker_init_fn=_ignore_sigint if workers else None)
            setattr(self, attr, loader)
        loader.batch_sampler.set([(i, b) for i, b in batches if len(b)], items or (lambda i, b: b.tolist()))
        chans, size = self.info["in_chans"], self.recipe["img_size"]
        try:
            decoded = iter(loader)
            for _, b in batches:
                yield next(decoded) if len(b) else (torch.empty(0, chans, size, size), torch.empty(0, dtype=torch.long))
        except DataError as exc:  # from a worker: its message, without the worker's traceback
            from .streaming import worker_message

            raise DataError(worker_message(exc)) from None

    def _augment(self, x, y, epoch: int, step: int):
        """Reseed the global RNGs (dropout, drop-path) for this step and rank, then translate / flip
        (streamed folders flip in their timm transform), then mixup / cutmix."""
        seed = _step_seed(self.recipe["seed"], epoch, step, self.group.rank)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if self.recipe["translate"] > 0:
            x = _random_translate(x, self.recipe["translate"], gen)
        if self.recipe["hflip"] and not self.streaming:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.mixup is not None:
            np.random.seed(seed)  # timm's Mixup draws lambda and the boxes from numpy's global RNG
            x, y = self._mix(x, y)
        return x, y

    def _mix(self, x, y):
        """timm's Mixup in batch mode pairs example i with B-1-i and needs an even batch: when this
        process's batch is odd (an odd per-process batch size, or the epoch's last batch), its last
        example keeps its image, with the same smoothed one-hot target."""
        even = x.shape[0] - x.shape[0] % 2
        if even == x.shape[0]:
            return self.mixup(x, y) if even else (x, self._soft(y))
        x_mix, y_mix = self.mixup(x[:even].clone(), y[:even]) if even else (x[:0], self._soft(y[:0]))
        return torch.cat([x_mix, x[even:]]), torch.cat([y_mix, self._soft(y[even:])])

    def _soft(self, y):
        from timm.data.mixup import mixup_target

        return mixup_target(y, self.info["num_classes"], lam=1.0, smoothing=self.recipe["label_smoothing"])

    @torch.no_grad()
    def _evaluate(self, interrupt, module) -> tuple[float, float]:
        """Loss and accuracy of `module` (the model or its EMA) on the test set, under --amp's autocast;
        rank r evaluates examples r, r + world, ... and the sums are all-reduced. Every rank runs the
        same number of forwards (FSDP2 all-gathers in them)."""
        was_training = module.training
        module.eval()
        world, rank = self.group.world, self.group.rank
        n_test = len(self.test_ds)
        bs = self.recipe["eval_batch_size"]
        n_batches = math.ceil(math.ceil(n_test / world) / bs)
        if self.streaming:
            mine = torch.arange(rank, n_test, world)
            batches = self._stream(self.test_ds, "_test_loader",
                                   [(i, mine[i * bs:(i + 1) * bs]) for i in range(n_batches)])
        else:
            x_all, y_all = (t[rank::world] for t in self.test_ds.tensors)
            batches = ((x_all[i * bs:(i + 1) * bs], y_all[i * bs:(i + 1) * bs]) for i in range(n_batches))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with _autocast(self.device, self.recipe["amp"]):
                logits = module(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(-1) == y).sum()
            if world == 1 and interrupt.requested:  # with several ranks, they agree on stopping after it
                raise KeyboardInterrupt
        module.train(was_training)
        loss_sum, correct = self.group.all_sum([loss_sum.item(), correct.item()])
        n = max(n_test, 1)
        return loss_sum / n, correct / n

    def _save(self) -> Path:
        """Full (unsharded) tensors, written by rank 0; every rank raises if the write failed."""
        if self.args.fsdp:  # collective: every rank takes part, rank 0 receives the full tensors
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
            if self.group.is_main:
                optimizer_state = _optimizer_state_by_index(optimizer_state, self.param_names)
        else:
            model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        path = self.out / "checkpoint.pt"
        failure = None
        if self.group.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": self.args.model,
                "dataset": self.args.dataset,
                "args": {k: v for k, v in vars(self.args).items()},
                "recipe": dict(self.recipe),
                "model_state": model_state,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.progress["epoch"],
                "step": self.progress["step"],
                "progress": dict(self.progress),
                "rng": _rng_state(),
                "world_size": self.group.world,
                **({"ema_state": self.ema.module.state_dict()} if self.ema is not None else {}),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                "data_order": {"seed": _data_order_seed(self.recipe["seed"], self.progress["epoch"]),
                               "generator": _data_order_generator(self.recipe["seed"],
                                                                  self.progress["epoch"]).get_state()},
            }
            try:
                save_checkpoint(state, path)
            except CheckpointWriteError as exc:
                failure = exc
        if self.group.world > 1 and self.group.all_sum([failure is not None])[0] > 0 and failure is None:
            raise CheckpointWriteError(f"rank 0 could not write checkpoint {path}; the previous checkpoint is unchanged")
        if failure is not None:
            raise failure
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


def _restore(path: Path, load, model_name: str) -> None:
    """Run `load()` (load_state_dict calls), turning a mismatch into a UsageError."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"checkpoint {path} does not fit {model_name} as built now ({_one_line(exc)}); "
                         "expected the same model, dataset and recipe") from None


def _optimizer_state_by_index(state: dict, names: list[list[str]]) -> dict:
    """A parameter-name-keyed optimizer state dict (torch.distributed.checkpoint's) → the
    index-keyed form of `Optimizer.state_dict()`, which checkpoints hold whatever the wrapper."""
    index = {name: i for i, name in enumerate(n for group in names for n in group)}
    groups = [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]
    return {"state": {index[name]: v for name, v in state["state"].items()}, "param_groups": groups}


def _optimizer_state_by_name(state: dict, names: list[list[str]]) -> dict:
    """The inverse of `_optimizer_state_by_index`."""
    flat = [n for group in names for n in group]
    groups = [dict(g, params=[flat[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {flat[i]: v for i, v in state["state"].items()}, "param_groups": groups}


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
        if given is None and ckpt is not None and key not in saved and key in SMALL_RECIPE:
            recipe[key] = SMALL_RECIPE[key]  # a checkpoint from before augmentation options: it trained without

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
    check(recipe["clip_grad"] >= 0 and math.isfinite(recipe["clip_grad"]),
          f"--clip-grad must be a finite norm ≥ 0 (0 = off), got {recipe['clip_grad']}")
    check(0 <= recipe["model_ema_decay"] < 1, f"--model-ema-decay must be in [0, 1), got {recipe['model_ema_decay']}")
    for key in ("mixup", "cutmix"):
        check(recipe[key] is None or (recipe[key] >= 0 and math.isfinite(recipe[key])),
              f"--{key} must be ≥ 0, got {recipe[key]}")
    check(recipe["reprob"] is None or 0 <= recipe["reprob"] <= 1, f"--reprob must be in [0, 1], got {recipe['reprob']}")
    if recipe["aa"] is not None and recipe["aa"] != "none":
        from .streaming import check_aa  # imports timm

        check(check_aa(recipe["aa"]), f"--aa {recipe['aa']!r} is not a timm auto-augment policy; expected e.g. "
              "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original, or none")
    return recipe


def _resolve_augmentation(recipe: dict, args, deit: bool) -> None:
    """Fill the augmentation keys left at None with the recipe of the model's size (see RECIPE_DEFAULTS);
    options of streamed folders only are off for in-memory datasets and rejected when given."""
    streaming = args.dataset == "imagefolder"
    defaults = DEIT_RECIPE if deit else SMALL_RECIPE
    for key in ("aa", "mixup", "cutmix", "reprob", "rrc"):
        if key in STREAM_ONLY and not streaming:
            given = getattr(args, key)
            if given is not None and given not in ("none", 0, 0.0, False):
                raise UsageError(f"--{key} transforms decoded images, which only --dataset imagefolder streams; "
                                 f"expected --dataset imagefolder (or drop --{key})")
            recipe[key] = SMALL_RECIPE[key]
        elif recipe[key] is None:
            recipe[key] = defaults[key]


def _fresh_progress() -> dict:
    """Progress within an epoch (reset at every epoch end) plus what spans epochs."""
    return {"epoch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0, "lr": 0.0,
            "best_acc": 0.0, "history": []}


def _write_history(path: Path, history: list[dict]) -> None:
    """metrics.jsonl = the checkpoint's epochs (drops lines of epochs the checkpoint never saw)."""
    with open(path, "w") as f:
        for metrics in history:
            f.write(json.dumps(metrics) + "\n")


def _trim_step_log(path: Path, last_step: int) -> None:
    """Keep the steps.jsonl lines up to global step `last_step` (the checkpoint's): the steps after it
    are run again. A torn last line (the process was killed while writing it) is dropped too."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("global_step", last_step + 1) <= last_step:
                kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _rss_mb() -> float:
    """This process's resident set size in MiB (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# What peak_mem_mb measures, per device type (printed in the epoch line).
_PEAK_MEMORY_KIND = {"cuda": "allocated", "cpu": "RSS"}


def _reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's high-water mark of the resident set
    (writing 5 to /proc/self/clear_refs; elsewhere the peak stays the process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_memory_mb(device: torch.device) -> float:
    """MiB since `_reset_peak_memory`: CUDA tensors allocated (torch.cuda.max_memory_allocated), or the
    process's peak resident set (VmHWM; getrusage's ru_maxrss where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def _step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    entropy = [seed % 2 ** 32, epoch, step] + ([rank] if rank else [])  # rank 0: the single-process seed
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


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

def _train_step(model, optimizer, scheduler, criterion, x, y, scale: float, amp: str = "off", scaler=None,
                clip_grad: float = 0.0) -> torch.Tensor:
    """One optimizer step on the loss summed over the local batch times `scale` = world / global
    batch: DDP and FSDP2 average gradients over the ranks, so the step follows the mean loss of the
    global batch whatever the ranks' shares. Returns the local loss sum (detached).

    `amp` ("off", "bf16", "fp16"): the forward under torch.autocast; the loss is taken in float32.
    `scaler`: a GradScaler (fp16), which skips the update when a gradient is inf/NaN. `clip_grad` > 0:
    the gradients' global norm (over all ranks' shards under FSDP2, whose gradients are DTensors) is
    clipped to it, after unscaling.
    """
    with _autocast(x.device, amp):
        logits = model(x)
    loss_sum = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        (loss_sum * scale).backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(_params(optimizer), clip_grad)
        optimizer.step()
    else:
        scaler.scale(loss_sum * scale).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(_params(optimizer), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    return loss_sum.detach()


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[amp])


def _check_amp(amp: str, device: torch.device) -> None:
    """UsageError unless autocast to `amp` runs on `device` (torch disables it with a warning otherwise)."""
    if amp == "off":
        return
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--amp bf16, but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         "expected --amp fp16 or off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enabled = torch.amp.is_autocast_available(device.type) and torch.autocast(
            device.type, dtype=_AMP_DTYPES[amp])._enabled
    if not enabled or caught:
        raise UsageError(f"--amp {amp} is not supported on {device.type} by this torch {torch.__version__}"
                         f"{f' ({_one_line(caught[0].message)})' if caught else ''}; expected --amp "
                         f"{'bf16' if amp == 'fp16' else 'off'} or a newer torch")


def _model_ema_class():
    """timm.utils.ModelEmaV3 (timm is optional: only --model-ema needs it)."""
    try:
        from timm.utils import ModelEmaV3
    except ImportError as exc:
        raise UsageError(f"--model-ema uses timm's ModelEmaV3, but timm cannot be imported ({_one_line(exc)}); "
                         "expected `pip install 'timm>=1.0'`") from None
    return ModelEmaV3


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> tuple[list[dict], list[list[str]]]:
    """No weight decay on biases, norms, position embeddings and class tokens. Returns the groups and
    the parameters' names in the same order."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip or name.endswith(("pos", "token")) else decay).append((name, param))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return groups, [[n for n, _ in decay], [n for n, _ in no_decay]]


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


class _BatchList:
    """A DataLoader batch_sampler whose batches the run replaces each epoch (the DataLoader, and with
    it its persistent workers, stays). A batch's items are made when the loader draws it, so an
    ImageNet epoch's million (index, seed, position) tuples never exist at once."""

    def __init__(self):
        self.batches, self.items = [], None

    def set(self, batches: list[tuple[int, torch.Tensor]], items) -> None:
        self.batches, self.items = batches, items

    def __iter__(self):
        return (self.items(i, b) for i, b in self.batches)

    def __len__(self):
        return len(self.batches)


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
    """While active, the first Ctrl-C or SIGTERM (what torchrun and batch schedulers send) only sets
    `requested` (the loop stops at the next step boundary, with the model and optimizer consistent);
    a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __enter__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print(f"\n{PROG}: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False


# ---------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------

def _out_dir(args) -> Path:
    return Path(args.out) if args.out else Path("runs") / f"{args.model}-{args.dataset}"


def _device(name: str, group: ProcessGroup) -> torch.device:
    """cpu, or cuda:LOCAL_RANK (one GPU per process under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; expected --device cpu or auto")
    if group.local_rank >= torch.cuda.device_count():
        raise UsageError(f"local rank {group.local_rank} needs its own GPU but torch sees "
                         f"{torch.cuda.device_count()}; expected --nproc_per_node ≤ the number of GPUs")
    return torch.device("cuda", group.local_rank)


def _is_train_checkpoint(path: str) -> bool:
    """Whether the file at `path` is one that tntkernels-train wrote (a dict holding model_state)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the caller reports timm's error
        return False
    return isinstance(ckpt, dict) and "model_state" in ckpt


def soft_target_cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_batch Σ_class −target · log_softmax(logits): timm's SoftTargetCrossEntropy times the batch size,
    and 0 for an empty batch. logits, target (B, K); float32 result."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum()


def _default_img_size(models, name: str) -> int:
    """The model's input size from its pretrained_cfg, built on the meta device when possible."""
    try:
        with torch.device("meta"):
            probe = models.create_model(name)
    except Exception:  # some constructors need real tensors; build it for real then
        probe = models.create_model(name)
    return int(probe.pretrained_cfg["input_size"][-1])


def _default_workers(dataset: str, local_world: int | None = None) -> int:
    """--workers when not given: 0 for the in-memory datasets (a batch is a tensor slice; worker
    processes would only add copies), else (imagefolder, decoded from disk) min(8, the CPU cores this
    process may use / the processes on this node), so torchrun's processes share the cores."""
    if dataset in ("digits", "mnist", "cifar10"):
        return 0
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores // max(local_world, 1))


def _limit(ds, n: int | None):
    """The first n examples of a fixed (seed 0) shuffle, so every class stays represented."""
    if n is None or n >= len(ds):
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    if hasattr(ds, "subset"):  # a streamed folder: the file list
        return ds.subset(keep.numpy())
    return torch.utils.data.TensorDataset(*(t[keep] for t in ds.tensors))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

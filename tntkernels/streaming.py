"""Image folders streamed from disk through timm's data pipeline (imported by train.py on demand).

    train_ds, test_ds, info = open_imagefolder(data_dir)       # file lists only: nothing is decoded
    set_transforms(train_ds, test_ds, model.pretrained_cfg, img_size, in_chans, aa=..., reprob=..., rrc=..., hflip=...)

`load_dataset("imagefolder", ...)` (data.py) decodes every image into one float tensor, which is fine
for a few thousand images but would need ~770 GB for ImageNet-1k. Here a dataset holds only the file
names (one fixed-width numpy byte array, so forked DataLoader workers do not copy it by touching
Python refcounts) and each image is decoded when a batch asks for it, by the DataLoader's workers.

Transforms are timm's (`timm.data.create_transform`) with the model's `pretrained_cfg` resolved by
`timm.data.resolve_data_config` (missing keys get timm's defaults: bicubic, ImageNet mean/std, crop_pct
0.875): random-resized crop, horizontal flip, RandAugment and random erasing for training, resize +
center crop for evaluation. Without random-resized crops (--no-rrc, the small-model default) training
sees the whole image resized, so evaluation does too (crop_pct 1).

Determinism: a training item is (index, step_seed, position); `__getitem__` seeds Python's, numpy's
and torch's RNGs from (step_seed, position) before the transform, so an image's augmentation depends
only on (seed, epoch, step, position in the batch): not on the number of workers, on which worker
decodes it, or on whether the run was resumed. In the main process (--workers 0) the CPU RNG states
(Python's, numpy's, torch's) are restored afterwards.

Unreadable images raise `DataError` naming the file. timm's `ImageDataset.__getitem__` would log a
warning and silently substitute the next image, which changes the data without telling anyone, so
`StreamingImageFolder` keeps timm's dataset interface (reader, filename(s), transform) but loads the
image itself.
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from .data import GRAY_MODES, DataError, _bad_image, _check_dir, _image_mode, _imagefolder_files

try:
    from timm.data import ImageDataset, create_transform, resolve_data_config
    from timm.data.readers.reader import Reader
except ImportError:  # pragma: no cover - timm is a test dependency
    raise DataError("--dataset imagefolder streams images through timm's data pipeline; expected timm to be "
                    "installed (pip install 'timm>=1.0', or tntkernels[timm])") from None

MODE_SAMPLE = 256  # headers read to decide colour or gray (a full scan of ImageNet's would take minutes)


class FileListReader(Reader):
    """timm Reader over a fixed list of files: root + relative paths (numpy bytes) and labels (int64)."""

    def __init__(self, root: Path, files: list[tuple[str, int]]):
        super().__init__()
        self.root = Path(root)
        # the paths are os.path.join(root, class, name); a root of "." or "./" may have been normalised away
        head = os.path.join(str(self.root), "")
        rel = [os.fsencode(p[len(head):] if p.startswith(head) else os.path.relpath(p, self.root)) for p, _ in files]
        self.paths = np.array(rel, dtype=np.bytes_) if rel else np.zeros(0, dtype="S1")
        self.labels = np.array([label for _, label in files], dtype=np.int64)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.paths[index])

    def __getitem__(self, index):
        return open(self.path(index), "rb"), int(self.labels[index])

    def __len__(self):
        return len(self.labels)

    def _filename(self, index, basename=False, absolute=False):
        path = self.path(index)
        return path.name if basename else str(path.resolve() if absolute else path.relative_to(self.root))

    def subset(self, indices) -> "FileListReader":
        out = FileListReader.__new__(FileListReader)
        out.root, out.paths, out.labels = self.root, self.paths[indices], self.labels[indices]
        return out


class StreamingImageFolder(ImageDataset):
    """dataset[i] or dataset[(i, step_seed, position)] -> (image tensor (C, S, S), label)."""

    def __init__(self, reader: FileListReader, classes: list[str], mode: str):
        super().__init__(root=str(reader.root), reader=reader, input_img_mode=mode)
        self.classes = classes

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.reader.labels)

    def subset(self, indices) -> "StreamingImageFolder":
        out = StreamingImageFolder(self.reader.subset(np.asarray(indices)), self.classes, self.input_img_mode)
        out.transform = self.transform
        return out

    def __getitem__(self, item):
        index, seed = (item[0], item[1:]) if isinstance(item, tuple) else (item, None)
        path = self.reader.path(index)
        img = _load(path, self.input_img_mode)
        with _seeded(seed):
            x = self.transform(img) if self.transform is not None else img
        return x, int(self.reader.labels[index])


def open_imagefolder(data_dir) -> tuple[StreamingImageFolder, StreamingImageFolder, dict]:
    """The imagefolder layout of data.py (same rules, same errors), as file lists. `info` has the keys
    of `load_dataset`'s; mean and std are filled in by `set_transforms`."""
    data_dir = _check_dir("imagefolder", data_dir)
    train_files, test_files, classes = _imagefolder_files(data_dir)
    files = train_files + test_files
    sample = files[::max(1, len(files) // MODE_SAMPLE)]
    gray = all(_image_mode(path) in GRAY_MODES for path, _ in sample)
    mode = "L" if gray else "RGB"  # images of another mode are converted when decoded
    train_ds = StreamingImageFolder(FileListReader(data_dir, train_files), classes, mode)
    test_ds = StreamingImageFolder(FileListReader(data_dir, test_files), classes, mode)
    info = {"name": "imagefolder", "num_classes": len(classes), "in_chans": 1 if gray else 3, "img_size": None,
            "n_train": len(train_files), "n_test": len(test_files), "mean": None, "std": None,
            "classes": list(classes)}
    return train_ds, test_ds, info


def set_transforms(train_ds, test_ds, pretrained_cfg: dict, img_size: int, in_chans: int, *, aa: str | None,
                   reprob: float, rrc: bool, hflip: bool) -> dict:
    """timm's train / eval transforms for the model's pretrained_cfg at img_size; returns the data config."""
    cfg = resolve_data_config({"input_size": (in_chans, img_size, img_size)}, pretrained_cfg=dict(pretrained_cfg))
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if in_chans == 1 and len(mean) != 1:  # an RGB default (ImageNet's) for a gray model: its average
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    crop_pct = cfg["crop_pct"] if rrc else 1.0
    common = dict(input_size=img_size, interpolation=cfg["interpolation"], mean=mean, std=std)
    train_ds.transform = create_transform(
        **common, is_training=True, scale=None if rrc else (1.0, 1.0), ratio=None if rrc else (1.0, 1.0),
        hflip=0.5 if hflip else 0.0, color_jitter=0.0, auto_augment=aa, re_prob=reprob, re_mode="pixel")
    test_ds.transform = create_transform(**common, is_training=False, crop_pct=crop_pct,
                                         crop_mode=cfg.get("crop_mode"))
    _posterize_zero_bits_safe(train_ds.transform)
    return dict(cfg, mean=mean, std=std, crop_pct=crop_pct)


def _posterize_zero_bits_safe(transform) -> None:
    """RandAugment's PosterizeIncreasing keeps 4 - int(level / 10 · 4) bits, 0 when the magnitude noise
    (mstd) reaches level 10; Pillow ≥ 12 rejects bits=0 (ValueError, killing the run at a random
    step) where older Pillow returned a black image. Give timm's posterize ops that old behaviour."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", ()):
        policy = getattr(t, "ops", None) or [op for sub in getattr(t, "policy", ()) for op in sub]
        for op in policy:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


def _posterize(img, bits_to_keep, **kwargs):
    from timm.data import auto_augment
    from PIL import Image

    if bits_to_keep < 1:  # keep no bit: every channel 0
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def worker_message(exc: BaseException) -> str:
    """The original one-line message of an exception a DataLoader worker re-raised in the main process
    (its text is then 'Caught X in DataLoader worker process N.' plus the worker's traceback)."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _load(path: Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert(mode)  # decodes now: a truncated file fails here, naming the file
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise _bad_image(path, exc) from None


@contextlib.contextmanager
def _seeded(seed):
    """Seed the global RNGs from (step_seed, position) for one image's transform; in the main
    process put them back afterwards (workers own theirs)."""
    if seed is None:
        yield
        return
    s = int(np.random.SeedSequence([int(v) for v in seed]).generate_state(1)[0])
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def check_aa(policy: str) -> bool:
    """Whether timm understands the auto-augment policy string."""
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception:  # timm asserts / raises on unknown policies
        return False
    return True

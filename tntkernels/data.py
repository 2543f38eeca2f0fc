"""Datasets for the training job, loaded whole into memory as normalized float tensors.

    load_dataset(name, data_dir=None, img_size=32) -> (train_ds, test_ds, info)

Datasets (see `DATASETS`):
    digits:      scikit-learn's `load_digits()` (1,797 real 8×8 handwritten digits, shipped with
                 scikit-learn, no download); fixed stratified 80/20 split (random_state 0).
    mnist:       the four MNIST IDX files (optionally .gz) in data_dir (or data_dir/MNIST/raw).
    cifar10:     the CIFAR-10 python batches in data_dir (or data_dir/cifar-10-batches-py).
    imagefolder: data_dir/{train,test|val}/<class>/*.png|jpg|jpeg|bmp, or data_dir/<class>/...
                 with a fixed stratified 80/20 split (random_state 0).

Every image is resized to img_size × img_size (bilinear) and normalized per channel with the mean
and std of the training split. The training job streams image folders instead (file lists, decoded
per batch: tntkernels/streaming.py), with the same layout rules and errors (`_imagefolder_files`). Bad input raises `DataError` (a ValueError) with a one-line message
saying what was expected.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

DATASETS = ("digits", "mnist", "cifar10", "imagefolder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
GRAY_MODES = ("1", "L", "LA")

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (N,)


class DataError(ValueError):
    """A dataset is unknown, missing, corrupt or inconsistent; the message says what was expected."""


def load_dataset(name: str = "digits", data_dir: str | Path | None = None, img_size: int = 32):
    """Load a dataset as in-memory tensors.

    Args:
        name: one of `DATASETS`.
        data_dir: folder holding the files (not needed for "digits").
        img_size: output height and width; images are resized with bilinear interpolation.
    Returns:
        train_ds, test_ds: `TensorDataset(images, labels)` — images (N, C, img_size, img_size)
            float32, normalized per channel with the training split's mean and std; labels (N,)
            int64 in [0, num_classes).
        info: dict(name, num_classes, in_chans, img_size, n_train, n_test, mean, std, classes).
    Raises:
        DataError: unknown name; missing data_dir or files; corrupt or truncated files; empty
            class folders; label counts that do not match the images.
    """
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
    if name != "digits":
        data_dir = _check_dir(name, data_dir)
    x_train, y_train, x_test, y_test, classes = _LOADERS[name](data_dir, img_size)

    x_train, x_test = _resize(x_train, img_size), _resize(x_test, img_size)  # (N, C, S, S) float32
    mean = x_train.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = x_train.std(dim=(0, 2, 3)).double().clamp_min(1e-6)
    shape = (1, -1, 1, 1)
    x_train = ((x_train - mean.view(shape)) / std.view(shape)).float()
    x_test = ((x_test - mean.view(shape)) / std.view(shape)).float()

    info = {
        "name": name,
        "num_classes": len(classes),
        "in_chans": x_train.shape[1],
        "img_size": img_size,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "mean": tuple(mean.tolist()),
        "std": tuple(std.tolist()),
        "classes": list(classes),
    }
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), info


# ---------------------------------------------------------------------------------------------
# Per-dataset loaders: (data_dir, img_size) -> (x_train, y_train, x_test, y_test, classes); images
# are float32 tensors (N, C, H, W) scaled to [0, 1] (imagefolder already resized to img_size),
# labels int64 tensors (N,).
# ---------------------------------------------------------------------------------------------

def _load_digits(data_dir, img_size: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (torch.from_numpy(x_tr)[:, None], torch.from_numpy(y_tr),
            torch.from_numpy(x_te)[:, None], torch.from_numpy(y_te), [str(c) for c in range(10)])


def _load_mnist(data_dir: Path, img_size: int):
    root = data_dir
    if not _find_file(root, MNIST_FILES["train_images"]) and (root / "MNIST" / "raw").is_dir():
        root = root / "MNIST" / "raw"  # torchvision's layout
    paths = {}
    missing = []
    for key, fname in MNIST_FILES.items():
        path = _find_file(root, fname)
        if path is None:
            missing.append(fname)
        paths[key] = path
    if missing:
        raise DataError(f"mnist: missing {', '.join(missing)} (or .gz) in {root}; expected the four MNIST IDX "
                        f"files {', '.join(MNIST_FILES.values())}")
    split = {}
    for part in ("train", "test"):
        images = _read_idx(paths[f"{part}_images"], IDX_IMAGES_MAGIC)
        labels = _read_idx(paths[f"{part}_labels"], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"mnist: {paths[f'{part}_labels'].name} holds {len(labels)} labels but "
                            f"{paths[f'{part}_images'].name} holds {len(images)} images; expected equal counts")
        _check_labels(labels, 10, paths[f"{part}_labels"])
        split[part] = (torch.from_numpy(images.astype(np.float32) / 255.0)[:, None],
                       torch.from_numpy(labels.astype(np.int64)))
    return (*split["train"], *split["test"], [str(c) for c in range(10)])


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: 4-byte big-endian magic, one big-endian uint32 per dim, data."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}; expected an IDX file (optionally gzipped)") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        got = f"0x{int.from_bytes(raw[:4], 'big'):08x}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(f"{path}: wrong IDX magic number {got}; expected 0x{magic:08x} "
                        f"(unsigned bytes, {ndim} dims)")
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes); expected {header} bytes of header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX dims {dims} need {expected} data bytes but the file holds "
                        f"{len(raw) - header}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_cifar10(data_dir: Path, img_size: int):
    root = data_dir
    if not (root / "test_batch").is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_paths = [root / f"data_batch_{i}" for i in range(1, 6) if (root / f"data_batch_{i}").is_file()]
    test_path = root / "test_batch"
    if not train_paths or not test_path.is_file():
        raise DataError(f"cifar10: expected data_batch_1..data_batch_5 (at least one) and test_batch in {root} "
                        f"(or {data_dir / 'cifar-10-batches-py'}), the CIFAR-10 python version")
    train = [_read_cifar_batch(p) for p in train_paths]
    x_test, y_test = _read_cifar_batch(test_path)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    to_images = lambda x: torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)  # noqa: E731
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return (to_images(x_train), torch.from_numpy(y_train), to_images(x_test), torch.from_numpy(y_test), classes)


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling garbage raises almost anything
        raise DataError(f"cannot unpickle {path} ({type(exc).__name__}: {_one_line(exc)}); expected a CIFAR-10 "
                        "python batch") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels' (a CIFAR-10 python batch)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {labels.size} labels for {len(data)} images; expected one label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels have dtype {labels.dtype}; expected integers 0..9")
    _check_labels(labels, 10, path)
    return data, labels.astype(np.int64)


def _load_imagefolder(data_dir: Path, img_size: int):
    train_files, test_files, classes = _imagefolder_files(data_dir)
    gray = all(_image_mode(path) in GRAY_MODES for path, _ in train_files + test_files)
    mode = "L" if gray else "RGB"

    def stack(files):
        arrays = [_read_image(path, mode, img_size) for path, _ in files]
        x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)  # (N, S, S) or (N, S, S, 3)
        x = x[:, None] if gray else x.permute(0, 3, 1, 2)  # (N, C, S, S)
        return x.contiguous(), torch.tensor([label for _, label in files], dtype=torch.int64)

    return (*stack(train_files), *stack(test_files), classes)


def _imagefolder_files(data_dir: Path):
    """The layout rules of imagefolder: (train_files, test_files, classes), files as (path, label)."""
    train_dir = data_dir / "train"
    if train_dir.is_dir():
        test_dir = next((data_dir / d for d in ("test", "val") if (data_dir / d).is_dir()), None)
        if test_dir is None:
            raise DataError(f"imagefolder: found {train_dir} but no {data_dir / 'test'} or {data_dir / 'val'}; "
                            "expected both splits as <split>/<class>/*.png|jpg|jpeg|bmp")
        classes = _class_dirs(train_dir)
        train_files = _list_images(train_dir, classes)
        test_classes = _class_dirs(test_dir)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"imagefolder: {test_dir} has classes {unknown} missing from {train_dir}; expected the "
                            "test classes to be a subset of the train classes")
        test_files = _list_images(test_dir, test_classes, index={c: i for i, c in enumerate(classes)})
    else:
        from sklearn.model_selection import train_test_split

        classes = _class_dirs(data_dir)
        files = _list_images(data_dir, classes)
        labels = [label for _, label in files]
        counts = np.bincount(labels, minlength=len(classes))
        if counts.min() < 2 or len(files) * 0.2 < len(classes):
            raise DataError(f"imagefolder: {data_dir} has too few images for a stratified 80/20 split "
                            f"(smallest class: {counts.min()}); expected at least 2 per class and 5 × classes in all, "
                            "or train/ and test/ folders")
        train_files, test_files = train_test_split(files, test_size=0.2, random_state=0, stratify=labels)
    return train_files, test_files, classes


_LOADERS = {"digits": _load_digits, "mnist": _load_mnist, "cifar10": _load_cifar10, "imagefolder": _load_imagefolder}


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------

def _check_dir(name: str, data_dir) -> Path:
    expected = {
        "mnist": "the MNIST IDX files " + ", ".join(MNIST_FILES.values()) + " (optionally .gz)",
        "cifar10": "the CIFAR-10 python batches data_batch_1..5 and test_batch",
        "imagefolder": "train/<class>/ and test/<class>/ image folders (or <class>/ folders)",
    }[name]
    if data_dir is None:
        raise DataError(f"{name} needs a data directory holding {expected}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{name}: data directory {data_dir} does not exist; expected a folder holding {expected}")
    return data_dir


def _find_file(root: Path, fname: str) -> Path | None:
    for candidate in (root / fname, root / (fname + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels range over {labels.min()}..{labels.max()}; expected 0..{num_classes - 1}")


def _class_dirs(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: no class folders in {root}; expected {root}/<class>/*.png|jpg|jpeg|bmp")
    return classes


def _list_images(root: Path, classes: list[str], index: dict[str, int] | None = None) -> list[tuple[str, int]]:
    """(path, label) per image, sorted by name within a class. Paths are str, not Path: for
    ImageNet's 1.28M files a Path each would take ~1 GB while the list is built."""
    index = index or {c: i for i, c in enumerate(classes)}
    files = []
    for c in classes:
        with os.scandir(root / c) as entries:
            found = sorted(e.path for e in entries
                           if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"imagefolder: class folder {root / c} holds no images; expected *.png, *.jpg, *.jpeg "
                            "or *.bmp files")
        files += [(p, index[c]) for p in found]
    return files


def _image_mode(path: Path) -> str:
    """PIL mode from the file header (cheap: the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise _bad_image(path, exc) from None


def _read_image(path: Path, mode: str, img_size: int) -> np.ndarray:
    """Decode, convert to `mode` ("L" or "RGB"), resize bilinearly to img_size²: uint8 (S, S) or (S, S, 3)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (img_size, img_size):
                img = img.resize((img_size, img_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise _bad_image(path, exc) from None


def _bad_image(path: Path, exc: BaseException) -> DataError:
    return DataError(f"cannot read image {path} ({type(exc).__name__}: {_one_line(exc)}); expected a valid "
                     "PNG, JPEG or BMP file")


def _resize(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """(N, C, H, W) → (N, C, img_size, img_size), bilinear (antialiased when shrinking)."""
    if x.shape[-2:] == (img_size, img_size):
        return x.contiguous()
    shrink = img_size < max(x.shape[-2:])
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=shrink)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""tntkernels.data: every dataset from small files in the real on-disk formats, and every DataError."""
from __future__ import annotations

import gzip
import pickle

import pytest

np = pytest.importorskip("numpy")
import torch  # noqa: E402

from tntkernels.data import DATASETS, DataError, load_dataset

PIL = pytest.importorskip("PIL.Image")


# ---------------------------------------------------------------------------------------------
# Writers for the real formats.
# ---------------------------------------------------------------------------------------------

def write_idx(path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> None:
    """IDX of unsigned bytes: big-endian magic 0x000008<ndim>, one big-endian uint32 per dim, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def make_mnist(root, n_train=20, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    x_tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_tr = np.arange(n_train) % 10
    y_te = (np.arange(n_test) * 3) % 10
    write_idx(root / "train-images-idx3-ubyte", x_tr, gz=gz)
    write_idx(root / "train-labels-idx1-ubyte", y_tr, gz=gz)
    write_idx(root / "t10k-images-idx3-ubyte", x_te, gz=gz)
    write_idx(root / "t10k-labels-idx1-ubyte", y_te, gz=gz)
    return x_tr, y_tr, x_te, y_te


def write_cifar_batch(path, n, seed, label_offset=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [(i + label_offset) % 10 for i in range(n)]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"batch", b"data": data, b"labels": labels, b"filenames": [b"x.png"] * n}, f)
    return data, labels


def make_cifar(root, batches=(1, 2), n=12, n_test=8):
    root.mkdir(parents=True, exist_ok=True)
    train = [write_cifar_batch(root / f"data_batch_{i}", n, seed=i, label_offset=i) for i in batches]
    test = write_cifar_batch(root / "test_batch", n_test, seed=99)
    return train, test


def write_png(path, size=(10, 12), mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    PIL.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode).save(path)


def make_folder(root, classes=("cat", "dog", "eel"), per_class=5, mode="RGB", ext=".png"):
    for ci, c in enumerate(classes):
        for i in range(per_class):
            write_png(root / c / f"img{i}{ext}", mode=mode, value=ci * 100 + i)


def assert_normalized(ds):
    x = ds.tensors[0].double()
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(x.shape[1], dtype=torch.float64), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# digits (the default: real data shipped with scikit-learn)
# ---------------------------------------------------------------------------------------------

def test_digits_shapes_split_and_normalization():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    train, test, info = load_dataset("digits", img_size=32)
    assert train.tensors[0].shape == (1437, 1, 32, 32) and test.tensors[0].shape == (360, 1, 32, 32)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert info | {"mean": None, "std": None, "classes": None} == {
        "name": "digits", "num_classes": 10, "in_chans": 1, "img_size": 32, "n_train": 1437, "n_test": 360,
        "mean": None, "std": None, "classes": None}
    assert_normalized(train)
    d = load_digits()
    _, _, y_tr, y_te = train_test_split(d.images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    assert torch.equal(train.tensors[1], torch.from_numpy(y_tr))
    assert torch.equal(test.tensors[1], torch.from_numpy(y_te))
    assert np.bincount(y_te).min() >= 35  # stratified


def test_digits_native_size_is_not_resampled():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    train, _, info = load_dataset("digits", img_size=8)
    d = load_digits()
    x_tr, _, _, _ = train_test_split(d.images, d.target, test_size=0.2, random_state=0, stratify=d.target)
    expected = (torch.from_numpy(x_tr / 16.0)[:, None] - info["mean"][0]) / info["std"][0]
    torch.testing.assert_close(train.tensors[0], expected.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# mnist (IDX)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = make_mnist(tmp_path, gz=gz)
    train, test, info = load_dataset("mnist", tmp_path, img_size=28)
    assert train.tensors[0].shape == (20, 1, 28, 28) and test.tensors[0].shape == (10, 1, 28, 28)
    assert torch.equal(train.tensors[1], torch.from_numpy(y_tr).long())
    assert torch.equal(test.tensors[1], torch.from_numpy(y_te).long())
    assert info["num_classes"] == 10 and info["in_chans"] == 1 and (info["n_train"], info["n_test"]) == (20, 10)
    assert_normalized(train)
    # at the native size the pixels are the file's bytes, normalized with the train statistics
    expected = (torch.from_numpy(x_te / 255.0)[:, None] - info["mean"][0]) / info["std"][0]
    torch.testing.assert_close(test.tensors[0], expected.float(), rtol=1e-5, atol=1e-5)


def test_mnist_resized_and_torchvision_layout(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", gz=True)
    train, test, info = load_dataset("mnist", tmp_path, img_size=32)
    assert train.tensors[0].shape == (20, 1, 32, 32) and test.tensors[0].shape == (10, 1, 32, 32)
    assert info["img_size"] == 32


# ---------------------------------------------------------------------------------------------
# cifar10 (python pickles)
# ---------------------------------------------------------------------------------------------

def test_cifar10_batches(tmp_path):
    (b1, b2), (x_te, y_te) = make_cifar(tmp_path, batches=(1, 2), n=12, n_test=8)
    train, test, info = load_dataset("cifar10", tmp_path, img_size=32)
    assert train.tensors[0].shape == (24, 3, 32, 32) and test.tensors[0].shape == (8, 3, 32, 32)
    assert train.tensors[1].tolist() == b1[1] + b2[1] and test.tensors[1].tolist() == y_te
    assert info["in_chans"] == 3 and info["num_classes"] == 10 and info["classes"][0] == "airplane"
    assert_normalized(train)
    # channel-major rows of 3072 bytes: R plane, G plane, B plane
    mean, std = torch.tensor(info["mean"]).view(3, 1, 1), torch.tensor(info["std"]).view(3, 1, 1)
    first = torch.from_numpy(x_te[0].reshape(3, 32, 32) / 255.0)
    torch.testing.assert_close(test.tensors[0][0], ((first - mean) / std).float(), rtol=1e-5, atol=1e-5)


def test_cifar10_subfolder_and_partial_batches(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py", batches=(3,), n=10, n_test=4)
    train, test, _ = load_dataset("cifar10", tmp_path, img_size=16)
    assert train.tensors[0].shape == (10, 3, 16, 16) and test.tensors[0].shape == (4, 3, 16, 16)


# ---------------------------------------------------------------------------------------------
# imagefolder (PIL)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("test_split", ["test", "val"])
def test_imagefolder_split_dirs(tmp_path, test_split):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / test_split, classes=("cat", "eel"), per_class=2, ext=".jpg")
    train, test, info = load_dataset("imagefolder", tmp_path, img_size=16)
    assert train.tensors[0].shape == (9, 3, 16, 16) and test.tensors[0].shape == (4, 3, 16, 16)
    assert info["classes"] == ["cat", "dog", "eel"] and info["num_classes"] == 3
    assert train.tensors[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.tensors[1].tolist() == [0, 0, 2, 2]  # indices of the train classes
    assert_normalized(train)


def test_imagefolder_flat_grayscale_stratified_split(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), per_class=10, mode="L")
    train, test, info = load_dataset("imagefolder", tmp_path, img_size=8)
    assert info["in_chans"] == 1
    assert train.tensors[0].shape == (16, 1, 8, 8) and test.tensors[0].shape == (4, 1, 8, 8)
    assert sorted(test.tensors[1].tolist()) == [0, 0, 1, 1]
    again, _, _ = load_dataset("imagefolder", tmp_path, img_size=8)
    assert torch.equal(again.tensors[0], train.tensors[0])  # the split is fixed


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    make_folder(tmp_path / "train", classes=("a",), per_class=2, mode="L")
    write_png(tmp_path / "train" / "b" / "x.bmp", mode="RGB")
    make_folder(tmp_path / "test", classes=("a",), per_class=1, mode="L")
    train, _, info = load_dataset("imagefolder", tmp_path, img_size=4)
    assert info["in_chans"] == 3 and train.tensors[0].shape == (3, 3, 4, 4)


# ---------------------------------------------------------------------------------------------
# Every DataError.
# ---------------------------------------------------------------------------------------------

def _raises(match, name, data_dir=None, img_size=32):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(name, data_dir, img_size)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_dataerror_is_valueerror():
    assert issubclass(DataError, ValueError)


def test_unknown_dataset_lists_the_known_ones():
    msg = _raises("unknown dataset 'svhn'", "svhn")
    assert all(name in msg for name in DATASETS)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_missing_data_dir(tmp_path, name):
    _raises("needs a data directory", name, None)
    _raises("does not exist", name, tmp_path / "nope")


def test_mnist_missing_files_named(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    msg = _raises("missing t10k-labels-idx1-ubyte", "mnist", tmp_path)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg


def test_mnist_wrong_magic(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), magic=0x00000801)
    _raises("wrong IDX magic number 0x00000801; expected 0x00000803", "mnist", tmp_path)


def test_mnist_labels_wrong_magic(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n")
    _raises("expected 0x00000801", "mnist", tmp_path)


def test_mnist_truncated_data(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    _raises("truncated or corrupt", "mnist", tmp_path)


def test_mnist_truncated_header(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:10])
    _raises("truncated IDX header", "mnist", tmp_path)


def test_mnist_corrupt_gzip(tmp_path):
    make_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    _raises("cannot read .*train-labels-idx1-ubyte.gz", "mnist", tmp_path)


def test_mnist_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19))
    _raises("19 labels .* 20 images", "mnist", tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 11))
    _raises("expected 0..9", "mnist", tmp_path)


def test_cifar_missing_files(tmp_path):
    tmp_path.joinpath("test_batch").write_bytes(b"")
    _raises("data_batch_1..data_batch_5 .* and test_batch", "cifar10", tmp_path)
    make_cifar(tmp_path / "other", batches=(1,))
    (tmp_path / "other" / "test_batch").unlink()
    _raises("test_batch", "cifar10", tmp_path / "other")


def test_cifar_unpicklable_batch(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    path.write_bytes(path.read_bytes()[:200])  # truncated pickle
    _raises("cannot unpickle .*data_batch_2", "cifar10", tmp_path)


def test_cifar_wrong_contents(tmp_path):
    make_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8)}, f)
    _raises("b'labels'", "cifar10", tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, f)
    _raises(r"expected uint8 \(N, 3072\)", "cifar10", tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, f)
    _raises("3 labels for 4 images", "cifar10", tmp_path)


def test_imagefolder_no_classes(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"")
    _raises("no class folders", "imagefolder", tmp_path)


def test_imagefolder_empty_class(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "test", per_class=1)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("no images here")
    _raises("class folder .*empty holds no images", "imagefolder", tmp_path)


def test_imagefolder_unreadable_image(tmp_path):
    make_folder(tmp_path, per_class=5)
    (tmp_path / "dog" / "img2.png").write_bytes(b"this is not a png")
    _raises("cannot read image .*img2.png", "imagefolder", tmp_path)


def test_imagefolder_truncated_image(tmp_path):
    make_folder(tmp_path, per_class=5)
    write_png(tmp_path / "dog" / "big.png", size=(64, 64))
    path = tmp_path / "dog" / "big.png"
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixels cut
    _raises("cannot read image .*big.png", "imagefolder", tmp_path)


def test_imagefolder_train_without_test(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    _raises("no .*test or .*val", "imagefolder", tmp_path)


def test_imagefolder_test_class_unknown(tmp_path):
    make_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    make_folder(tmp_path / "test", classes=("a", "zebra"), per_class=1)
    _raises("zebra", "imagefolder", tmp_path)


def test_imagefolder_too_few_images_to_split(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), per_class=1)
    _raises("too few images", "imagefolder", tmp_path)

"""Streamed image folders (tntkernels.streaming through `tntkernels-train --dataset imagefolder`):
timm transforms from the model's pretrained_cfg, per-image seeded augmentation, exact resume with
any --workers, one-line errors, and resident memory that does not grow with the number of images.

The folders hold real photographs: 32×32 crops of scikit-learn's two sample photos (china.jpg,
flower.jpg, shipped with scikit-learn), one class per photo and half (top / bottom)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("timm")
pytest.importorskip("sklearn")
PIL = pytest.importorskip("PIL.Image")
import torch  # noqa: E402

from helpers.train_runs import assert_one_error_line, metrics, run, without_timing  # noqa: E402
from tntkernels.data import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("china_top", "china_bottom", "flower_top", "flower_bottom")


def write_photo_folder(root: Path, n_train: int, n_test: int, size: int = 32, seed: int = 0) -> Path:
    """root/{train,test}/<class>/NNNNN.png: random size×size crops of the class's half photo."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photos
    halves = [half for p in photos for half in (p[:p.shape[0] // 2], p[p.shape[0] // 2:])]
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % len(CLASSES)
            half = halves[c]
            y, x = rng.integers(0, half.shape[0] - size), rng.integers(0, half.shape[1] - size)
            path = root / split / CLASSES[c] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.fromarray(half[y:y + size, x:x + size]).save(path, compress_level=1)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), n_train=40, n_test=12)


def weights(out_dir) -> dict:
    return torch.load(Path(out_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)["model_state"]




# ---------------------------------------------------------------------------------------------
# The dataset and its timm transforms.
# ---------------------------------------------------------------------------------------------

def _opened(folder, pretrained_cfg=None, img_size=32, **aug):
    from tntkernels.streaming import open_imagefolder, set_transforms

    train_ds, test_ds, info = open_imagefolder(folder)
    cfg = set_transforms(train_ds, test_ds, pretrained_cfg or {"input_size": (3, 224, 224)}, img_size,
                         info["in_chans"], **({"aa": None, "reprob": 0.0, "rrc": False, "hflip": False} | aug))
    return train_ds, test_ds, info, cfg


def test_file_lists_follow_the_imagefolder_layout(photos):
    train_ds, test_ds, info, cfg = _opened(photos)
    assert (len(train_ds), len(test_ds)) == (40, 12)
    assert info["classes"] == sorted(CLASSES) and info["in_chans"] == 3
    assert sorted(set(train_ds.labels.tolist())) == [0, 1, 2, 3]
    assert train_ds.filename(0).startswith("train/") and train_ds.filename(0, basename=True).endswith(".png")
    x, y = train_ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # timm's defaults fill what our pretrained_cfg lacks: ImageNet mean / std, bicubic
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    half = train_ds.subset(np.arange(0, 40, 2))
    assert len(half) == 20 and half.filename(1) == train_ds.filename(2)


def test_transforms_come_from_the_models_pretrained_cfg(photos):
    cfg_in = {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
              "interpolation": "bilinear", "crop_pct": 0.9}
    train_ds, test_ds, _, cfg = _opened(photos, cfg_in, img_size=48, rrc=True)
    assert (cfg["mean"], cfg["std"], cfg["interpolation"], cfg["crop_pct"]) == ((0.5,) * 3, (0.25,) * 3,
                                                                                "bilinear", 0.9)
    x, _ = test_ds[0]
    assert x.shape == (3, 48, 48)
    img = np.asarray(PIL.open(photos / "test" / test_ds.filename(0).split("/", 1)[1]), dtype=np.float64) / 255
    # evaluation: resize to 48 / 0.9, center crop 48; normalized with the cfg's mean and std
    assert (x.double() * 0.25 + 0.5).mean().item() == pytest.approx(img.mean(), abs=0.03)


def test_gray_folders_get_one_channel_and_averaged_imagenet_stats(tmp_path):
    for c in ("a", "b"):
        for split, n in (("train", 3), ("test", 1)):
            for i in range(n):
                path = tmp_path / split / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                PIL.fromarray(np.full((20, 20), 40 * i, np.uint8), mode="L").save(path)
    train_ds, _, info, cfg = _opened(tmp_path, {"input_size": (1, 32, 32)}, aa="rand-m9-mstd0.5-inc1",
                                     reprob=0.25, rrc=True, hflip=True)
    assert info["in_chans"] == 1 and len(cfg["mean"]) == 1
    assert train_ds[(0, 7, 0)][0].shape == (1, 32, 32)


def test_augmentation_is_a_function_of_the_item_seed(photos):
    train_ds, _, _, _ = _opened(photos, aa="rand-m9-mstd0.5-inc1", reprob=0.25, rrc=True, hflip=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_ds[(3, 11, 0)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the main process's RNGs are left as they were
    assert torch.equal(a, train_ds[(3, 11, 0)][0])
    assert not torch.equal(a, train_ds[(3, 12, 0)][0]) or not torch.equal(a, train_ds[(3, 11, 1)][0])


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "v0", "original"])
def test_posterize_to_zero_bits_is_black_not_an_error(photos, aa):
    """RandAugment's magnitude noise reaches level 10 = keep 0 bits, which Pillow ≥ 12 rejects."""
    train_ds, _, _, _ = _opened(photos, aa=aa)
    ops = [op for t in train_ds.transform.transforms
           for op in (getattr(t, "ops", None) or [o for sub in getattr(t, "policy", ()) for o in sub])]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize, [op.name for op in ops]
    img = PIL.open(photos / "train" / train_ds.filename(0).split("/", 1)[1]).convert("RGB")
    for op in posterize:
        assert not np.asarray(op.aug_fn(img, 0)).any()
        assert np.array_equal(np.asarray(op.aug_fn(img, 2)), np.asarray(img) & 0b11000000)


def test_unreadable_image_names_the_file(photos, tmp_path):
    from tntkernels.streaming import open_imagefolder

    bad = write_photo_folder(tmp_path / "bad", n_train=8, n_test=4)
    path = bad / "train" / CLASSES[1] / "00005.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels cut
    train_ds, _, _ = open_imagefolder(bad)
    with pytest.raises(DataError, match="cannot read image .*00005.png"):
        for i in range(len(train_ds)):
            train_ds[i]


# ---------------------------------------------------------------------------------------------
# Through the training job.
# ---------------------------------------------------------------------------------------------

# 19 of the 40 train images in batches of 8 at 16²: 3 steps per epoch, the last of 3 images (mixup's
# odd-batch path); every augmentation on.
AUG = ["--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--rrc", "--hflip"]


def tiny(photos, out, *extra):
    return ["--dataset", "imagefolder", "--data-dir", photos, "--batch-size", "8", "--epochs", "2", "--img-size", "16",
            "--limit-train", "19", "--limit-test", "12", "--out", out, *AUG, *extra]


def test_resume_is_exact_with_any_workers(photos, tmp_path, capsys):
    """Straight with 2 workers == stopped mid-epoch 2 with no workers, resumed with 1, bit for bit."""
    rc, out, err = run(tiny(photos, tmp_path / "straight", "--workers", "2"), capsys)
    assert rc == 0, err
    assert "on imagefolder: 19 train / 12 test, 3×16×16, 4 classes" in out
    rc, out, err = run(tiny(photos, tmp_path / "split", "--workers", "0", "--stop-after-steps", "4"), capsys)
    assert rc == 0 and "stopped after 4" in out, err
    rc, out, err = run(["--dataset", "imagefolder", "--resume", tmp_path / "split" / "checkpoint.pt",
                        "--workers", "1"], capsys)
    assert rc == 0 and "resuming" in out, err
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [without_timing(m) for m in metrics(tmp_path / "straight")] == \
        [without_timing(m) for m in metrics(tmp_path / "split")]


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_and_exit_2(tmp_path, capsys, workers):
    bad = write_photo_folder(tmp_path / "bad", n_train=8, n_test=4)
    path = bad / "test" / CLASSES[2] / "00002.png"
    path.write_bytes(b"not a png at all")
    rc, _, err = run(["--dataset", "imagefolder", "--data-dir", bad, "--epochs", "1", "--batch-size", "8",
                      "--img-size", "16", "--workers", workers, "--out", tmp_path / "run"], capsys)
    assert_one_error_line(rc, err, "cannot read image", "00002.png")


@pytest.mark.parametrize("argv, fragments", [
    (["--dataset", "imagefolder", "--data-dir", "{empty}"], ["no class folders"]),
    (["--aa", "rand-m9-mstd0.5-inc1"], ["--aa transforms decoded images", "--dataset imagefolder"]),
    (["--dataset", "imagefolder", "--data-dir", "{photos}", "--aa", "bogus-policy"], ["not a timm auto-augment"]),
    (["--mixup", "-1"], ["--mixup must be ≥ 0"]),
    (["--reprob", "1.5"], ["--reprob must be in [0, 1]"]),
])
def test_bad_options_are_one_line_and_exit_2(photos, tmp_path, capsys, argv, fragments):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", photos=photos) for a in argv]
    rc, _, err = run(argv + ["--out", tmp_path / "run"], capsys)
    assert_one_error_line(rc, err, *fragments)


def test_mixup_on_in_memory_data_uses_soft_targets(tmp_path, capsys):
    rc, out, err = run(["--limit-train", "17", "--limit-test", "16", "--batch-size", "16", "--epochs", "1",
                        "--mixup", "0.8", "--cutmix", "1.0", "--out", tmp_path], capsys)  # last batch: 1 (odd)
    assert rc == 0, err
    assert np.isfinite(metrics(tmp_path)[0]["train_loss"])


# ---------------------------------------------------------------------------------------------
# Done-when: resident memory does not grow with the number of images.
# ---------------------------------------------------------------------------------------------

def _start(folder: Path, out: Path, steps: int) -> subprocess.Popen:
    """A training run that logs its resident memory at every step; workers 0, so all decoding
    happens in the measured process."""
    cmd = [sys.executable, "-m", "tntkernels.train", "--dataset", "imagefolder", "--data-dir", str(folder),
           "--batch-size", "32", "--epochs", "1", "--workers", "0", "--stop-after-steps", str(steps),
           "--log-every", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _peak_rss_mb(proc: subprocess.Popen, out: Path) -> float:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return max(json.loads(line)["rss_mb"] for line in (out / "steps.jsonl").read_text().splitlines())


def _linked_copy(folder: Path, root: Path, n_train: int) -> Path:
    """root/{train,test}/<class>/NNNNN.png: hard links to folder's images, cycled to n_train train
    images (streaming opens each file by name: links cost no disk and no time to write)."""
    for split in ("train", "test"):
        files = sorted((folder / split).glob("*/*.png"))
        for i in range(n_train if split == "train" else len(files)):
            src = files[i % len(files)]
            dst = root / split / src.parent.name / f"{i:05d}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    return root


@pytest.mark.integration
def test_resident_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # 1,000 real photo crops, and 20,000 hard links cycling over them: what load_dataset (everything in
    # memory, float32 3×32×32) would add for the extra 19,000 images (≈ 223 MiB) dwarfs the run-to-run
    # noise of a torch process's peak RSS (up to ~15 MiB measured on CI's 2-core machine under load).
    small, large = 1000, 20000
    folders = {small: write_photo_folder(tmp_path / f"n{small}", n_train=small, n_test=8, seed=small)}
    folders[large] = _linked_copy(folders[small], tmp_path / f"n{large}", n_train=large)
    procs = {n: _start(folders[n], tmp_path / f"run{n}", steps=2) for n in (small, large)}  # side by side
    peak = {n: _peak_rss_mb(procs[n], tmp_path / f"run{n}") for n in (small, large)}
    in_memory_growth_mb = (large - small) * 3 * 32 * 32 * 4 / 2 ** 20
    print(f"peak RSS: {peak[small]:.1f} MiB at {small} images, {peak[large]:.1f} MiB at {large}; "
          f"in-memory loading would add {in_memory_growth_mb:.1f} MiB")
    assert peak[large] - peak[small] < 0.25 * in_memory_growth_mb, peak


def test_fine_tune_from_a_weights_file_on_a_folder(photos, tmp_path, capsys):
    """--pretrained FILE on a streamed folder: every tensor but the classifier comes from the file (10
    classes there, 4 in the folder: timm re-initialises the head), and the run checkpoints."""
    from tntkernels.models import create_model

    # shifted weights: a run that ignored the file (its own seeded init) cannot match them
    src = {k: v + 0.25 for k, v in create_model("tnt_t_patch8_32", in_chans=3).state_dict().items()}  # 10 classes
    path = tmp_path / "w.pth"
    torch.save(src, path)
    argv = ["--model", "tnt_t_patch8_32", "--pretrained", path, "--dataset", "imagefolder", "--data-dir", photos,
            "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--limit-train", "8", "--limit-test", "4",
            "--lr", "1e-30", "--weight-decay", "0", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
            "--out", tmp_path / "run"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    state = weights(tmp_path / "run")
    heads = {k for k in src if k.startswith("head.")}
    assert heads and all(state[k].shape[0] == 4 for k in heads if k.endswith("weight"))
    for k, v in src.items():  # one step at lr 1e-30 moves a weight by about 1e-30
        if k not in heads:
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-20, msg=k)


@pytest.mark.parametrize("spelling", [".", "./"])
def test_folder_given_as_the_working_directory(photos, monkeypatch, spelling):
    """--data-dir . (or ./): the file list is relative to the root however the root is spelt."""
    from tntkernels.streaming import open_imagefolder

    monkeypatch.chdir(photos)
    train_ds, test_ds, info = open_imagefolder(spelling)
    assert len(train_ds) == 40 and len(test_ds) == 12
    for i in (0, len(train_ds) - 1):
        img, label = train_ds[i]  # decodes the file: a wrong relative path raises DataError
        assert 0 <= int(label) < len(CLASSES)


def test_pretrained_given_a_training_checkpoint_says_so_in_one_line(photos, tmp_path, capsys):
    argv = ["--model", "tnt_t_patch8_32", "--dataset", "imagefolder", "--data-dir", photos, "--img-size", "32",
            "--batch-size", "8", "--epochs", "1", "--limit-train", "8", "--limit-test", "4", "--aa", "none",
            "--mixup", "0", "--cutmix", "0", "--reprob", "0"]
    rc, out, err = run(argv + ["--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    rc, out, err = run(argv + ["--pretrained", tmp_path / "a" / "checkpoint.pt", "--out", tmp_path / "b"], capsys)
    assert_one_error_line(rc, err, "is a tntkernels-train checkpoint", "--resume")

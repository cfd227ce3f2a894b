"""Tests for art_reat.data: long-tailed subsets, class groups, splits, datasets, loader."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from art_reat.data import (
    DatasetSplits,
    DeviceLoader,
    balanced_small_indices,
    class_groups,
    load_dataset,
    long_tailed_counts,
    long_tailed_indices,
    random_crop_flip,
    stratified_split,
    stratified_subset,
)
from art_reat.errors import DataError, UsageError

# the shared data folder sits beside the repository (../shared/data), in CI as here
REAL = os.environ.get("ART_REAT_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_TRAIN = os.path.join(REAL, "cifar10", "train.npz")
needs_real = pytest.mark.skipif(
    not os.path.isfile(REAL_TRAIN), reason=f"real CIFAR-10 arrays not found at {REAL_TRAIN}"
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def real_train_labels():
    if not os.path.isfile(REAL_TRAIN):
        pytest.skip(f"real CIFAR-10 arrays not found at {REAL_TRAIN}")
    with np.load(REAL_TRAIN) as f:
        return f["y"]


def ldam_reference(targets, ur, seed=0):
    """LDAM-DRW's IMBALANCECIFAR10.gen_imbalanced_data, with the global RNG as they use it."""
    state = np.random.get_state()
    try:
        targets_np = np.array(targets, dtype=np.int64)
        classes = np.unique(targets_np)
        cls_num = len(classes)
        img_max = len(targets_np) / cls_num
        img_num_per_cls = [int(img_max * (1.0 / ur) ** (i / (cls_num - 1.0))) for i in range(cls_num)]
        np.random.seed(seed)
        new_idx = []
        for the_class, the_img_num in zip(classes, img_num_per_cls):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            new_idx.append(idx[:the_img_num])
        return np.concatenate(new_idx)
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------- counts


def test_counts_published_cifar10_ur50():
    assert long_tailed_counts(5000.0, 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


@pytest.mark.parametrize("ur", [10, 20, 50, 100])
@pytest.mark.parametrize("n_max,C", [(5000.0, 10), (500.0, 100)])
def test_counts_exp_formula(ur, n_max, C):
    expected = []
    for c in range(C):
        expected.append(int(n_max * (1.0 / ur) ** (c / (C - 1.0))))
    got = long_tailed_counts(n_max, C, ur)
    assert got == expected
    assert got[0] == int(n_max) and got[-1] == int(round(n_max / ur))
    assert all(a >= b for a, b in zip(got, got[1:]))


def test_counts_linear_tiny_imagenet():
    got = long_tailed_counts(500.0, 200, 100, profile="linear")
    assert len(got) == 200 and got[0] == 500 and got[-1] == 5
    assert all(a >= b for a, b in zip(got, got[1:]))
    # each count within one image of the straight line 500 -> 5
    line = np.linspace(500, 5, 200)
    assert np.all(np.abs(np.array(got) - line) < 1.0 + 1e-9)


def test_counts_bad_arguments():
    with pytest.raises(UsageError, match="0.5"):
        long_tailed_counts(5000.0, 10, 0.5)
    with pytest.raises(UsageError, match="profile"):
        long_tailed_counts(5000.0, 10, 10, profile="cubic")
    with pytest.raises(UsageError):
        long_tailed_counts(5.0, 10, 100)  # smallest class would be empty
    assert long_tailed_counts(5000.0, 10, 1) == [5000] * 10


# ----------------------------------------------------------------------------- indices


def test_randomstate_matches_global_seed_shuffle():
    state = np.random.get_state()
    try:
        a = np.arange(1000)
        np.random.seed(3)
        np.random.shuffle(a)
        np.random.shuffle(a)
    finally:
        np.random.set_state(state)
    b = np.arange(1000)
    rs = np.random.RandomState(3)
    rs.shuffle(b)
    rs.shuffle(b)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("ur", [10, 20, 50, 100])
def test_lt_indices_match_ldam_on_real_cifar10(real_train_labels, ur):
    before = np.random.get_state()[1].copy()
    got = long_tailed_indices(real_train_labels, ur, seed=0)
    assert np.array_equal(np.random.get_state()[1], before), "global RNG must not be touched"
    assert got.dtype == np.int64
    assert np.array_equal(got, ldam_reference(real_train_labels, ur, seed=0))
    counts = np.bincount(real_train_labels[got], minlength=10)
    assert counts.tolist() == [int(5000.0 * (1.0 / ur) ** (c / 9.0)) for c in range(10)]


def test_lt_indices_seed_changes_selection(real_train_labels):
    a = long_tailed_indices(real_train_labels, 50, seed=0)
    b = long_tailed_indices(real_train_labels, 50, seed=1)
    assert len(a) == len(b) and not np.array_equal(a, b)
    assert np.array_equal(b, ldam_reference(real_train_labels, 50, seed=1))


@pytest.mark.parametrize("ur", [10, 50, 100])
def test_balanced_small(ur):
    y = np.repeat(np.arange(10), 500)
    np.random.RandomState(0).shuffle(y)
    total = sum(int(500.0 * (1.0 / ur) ** (c / 9.0)) for c in range(10))
    idx = balanced_small_indices(y, ur, seed=0)
    assert len(idx) == total and len(np.unique(idx)) == total
    counts = np.bincount(y[idx], minlength=10)
    base, rem = divmod(total, 10)
    assert counts.tolist() == [base + 1] * rem + [base] * (10 - rem)
    assert np.array_equal(idx, balanced_small_indices(y, ur, seed=0))


# ----------------------------------------------------------------------------- class groups


def test_class_groups_cifar10():
    assert class_groups(10) == class_groups(10, "reference")
    assert class_groups(10, "reference") == {"head": [0, 1, 2], "body": [3, 4, 5, 6], "tail": [7, 8, 9]}
    assert class_groups(10, "paper") == {"head": [0, 1, 2], "body": [3, 4, 5], "tail": [6, 7, 8, 9]}


def test_class_groups_cifar100():
    ref = class_groups(100, "reference")
    assert ref["head"] == list(range(0, 33))
    assert ref["body"] == list(range(33, 67))
    assert ref["tail"] == list(range(67, 100))
    paper = class_groups(100, "paper")
    assert paper["head"] == list(range(0, 33))
    assert paper["body"] == list(range(33, 66))
    assert paper["tail"] == list(range(66, 100))
    with pytest.raises(UsageError, match="rule"):
        class_groups(10, "mine")


# ----------------------------------------------------------------------------- splits


def _unbalanced_labels():
    rng = np.random.RandomState(5)
    y = np.concatenate([np.full(n, c) for c, n in enumerate([200, 90, 31, 7, 2])])
    rng.shuffle(y)
    return y


def test_stratified_split_properties():
    y = _unbalanced_labels()
    keep, held = stratified_split(y, 0.1, seed=0)
    assert len(np.intersect1d(keep, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(y)))
    held_counts = np.bincount(y[held], minlength=5)
    keep_counts = np.bincount(y[keep], minlength=5)
    assert held_counts.tolist() == [20, 9, 3, 1, 1]  # round(0.1 n), at least one
    assert np.all(keep_counts >= 1)
    k2, h2 = stratified_split(y, 0.1, seed=0)
    assert np.array_equal(keep, k2) and np.array_equal(held, h2)
    _, h3 = stratified_split(y, 0.1, seed=1)
    assert not np.array_equal(held, h3)
    # tiny fraction still holds one image of every class out
    _, h4 = stratified_split(y, 0.001, seed=0)
    assert np.bincount(y[h4], minlength=5).tolist() == [1] * 5
    keep0, held0 = stratified_split(y, 0.0, seed=0)
    assert len(held0) == 0 and len(keep0) == len(y)


def test_stratified_split_errors():
    with pytest.raises(UsageError, match="at least 2"):
        stratified_split(np.array([0, 0, 1, 2, 2]), 0.2, seed=0)
    with pytest.raises(UsageError):
        stratified_split(np.array([0, 0, 1, 1]), 1.0, seed=0)


def test_stratified_subset_properties():
    y = np.repeat(np.arange(10), 100)
    np.random.RandomState(1).shuffle(y)
    idx = stratified_subset(y, 205, seed=0)
    assert len(idx) == 205 and len(np.unique(idx)) == 205
    assert np.bincount(y[idx], minlength=10).tolist() == [21] * 5 + [20] * 5
    assert np.array_equal(idx, stratified_subset(y, 205, seed=0))
    assert not np.array_equal(idx, stratified_subset(y, 205, seed=1))


def test_stratified_subset_errors():
    y = np.repeat(np.arange(4), [10, 10, 10, 3])
    with pytest.raises(UsageError, match="n=100") as e:
        stratified_subset(y, 100, seed=0)
    assert "33" in str(e.value)  # the data size
    with pytest.raises(UsageError, match="n=20") as e:
        stratified_subset(y, 20, seed=0)  # class 3 has 3 < 5
    assert "n=15" in str(e.value)  # the largest feasible size
    assert len(stratified_subset(y, 15, seed=0)) == 15


# ----------------------------------------------------------------------------- loader


def _images(n, h=16, w=16, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("device", DEVICES)
def test_loader_plain(device):
    x = _images(50)
    y = np.arange(50) % 7
    dl = DeviceLoader(x, y, batch_size=16, device=device)
    assert len(dl) == 4 and dl.num_samples == 50
    xs, ys = zip(*dl)
    assert [len(b) for b in ys] == [16, 16, 16, 2]
    xb = torch.cat(xs)
    assert xb.dtype == torch.float32 and xb.device.type == device and tuple(xb.shape) == (50, 3, 16, 16)
    assert ys[0].dtype == torch.int64
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(xb.cpu(), expected)
    assert torch.equal(torch.cat(ys).cpu(), torch.from_numpy(y).long())
    assert len(DeviceLoader(x, y, 16, device, drop_last=True)) == 3
    # a uint8 NCHW tensor works the same
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(torch.cat([b for b, _ in DeviceLoader(xt, y, 16, device)]).cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_loader_shuffle_visits_all(device):
    x = _images(103, 8, 8, 1)
    y = np.arange(103)  # labels identify samples
    dl = DeviceLoader(x, y, batch_size=10, device=device, shuffle=True, augment=True, seed=3)
    orders = []
    for _ in range(2):
        ys = torch.cat([b for _, b in dl]).cpu()
        assert sorted(ys.tolist()) == list(range(103))
        orders.append(ys)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    dl.set_epoch(0)
    assert torch.equal(torch.cat([b for _, b in dl]).cpu(), orders[0])
    dl2 = DeviceLoader(x, y, batch_size=10, device=device, shuffle=True, augment=True, seed=3)
    a = torch.cat([b for b, _ in dl2]).cpu()
    dl2.set_epoch(0)
    assert torch.equal(a, torch.cat([b for b, _ in dl2]).cpu())  # augmentation reproducible too
    xb, _ = next(iter(dl))
    assert xb.min() >= 0 and xb.max() <= 1


def _match_crops(out, src, pad):
    """For each sample, the (di, dj, flipped) placements of its padded source equal to it."""
    padded = F.pad(src, (pad, pad, pad, pad))
    h, w = src.shape[-2:]
    found = []
    for k in range(len(out)):
        hits = []
        for di in range(2 * pad + 1):
            for dj in range(2 * pad + 1):
                win = padded[k, :, di : di + h, dj : dj + w]
                if torch.equal(out[k], win):
                    hits.append((di, dj, False))
                if torch.equal(out[k], win.flip(-1)):
                    hits.append((di, dj, True))
        found.append(hits)
    return found


@pytest.mark.parametrize("device", DEVICES)
def test_crop_is_shifted_padded_copy(device):
    src = torch.from_numpy(_images(64, 12, 12)).permute(0, 3, 1, 2).float().div(255).to(device)
    out = random_crop_flip(src, 3, torch.Generator().manual_seed(0))
    assert out.shape == src.shape and out.dtype == src.dtype and out.device == src.device
    found = _match_crops(out.cpu(), src.cpu(), 3)
    assert all(len(h) == 1 for h in found), "every output must be exactly one placement of its source"
    placements = [h[0] for h in found]
    assert {p[2] for p in placements} == {False, True}
    assert len({p[:2] for p in placements}) > 15  # offsets vary across samples
    assert {p[0] for p in placements} <= set(range(7))


def test_flip_only_and_distinct_crops():
    src = torch.from_numpy(_images(40, 8, 8)).permute(0, 3, 1, 2).float()
    out = random_crop_flip(src, 0, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, src)]
    same = [torch.equal(o, s) for o, s in zip(out, src)]
    assert all(a != b for a, b in zip(flipped, same))  # each is the source or its mirror image
    assert 5 < sum(flipped) < 35
    one = src[:1].repeat(200, 1, 1, 1)
    crops = random_crop_flip(one, 4, torch.Generator().manual_seed(2))
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 50


def test_loader_augment_against_source():
    x = _images(30, 10, 10)
    dl = DeviceLoader(x, np.zeros(30), batch_size=30, augment=True, pad=2, seed=5)
    (xb, _), = list(dl)
    src = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    assert all(len(h) == 1 for h in _match_crops(xb, src, 2))
    assert not torch.equal(xb, src)


# ----------------------------------------------------------------------------- datasets


def _write(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _good_npz(tmp_path, n_classes=3, n=30):
    y = np.arange(n) % n_classes
    _write(tmp_path / "train.npz", x=_images(n, 8, 8), y=y)
    _write(tmp_path / "test.npz", x=_images(12, 8, 8, seed=1), y=np.arange(12) % n_classes)


def test_npz_good(tmp_path):
    _good_npz(tmp_path)
    d = load_dataset("npz", tmp_path)
    assert isinstance(d, DatasetSplits)
    assert d.num_classes == 3 and d.train_counts.tolist() == [10, 10, 10]
    assert d.y_train.dtype == np.int64 and d.x_train.shape == (30, 8, 8, 3) and len(d.y_test) == 12


BAD_TRAIN = {
    "missing y": dict(x=_images(6, 8, 8)),
    "float x": dict(x=_images(6, 8, 8).astype(np.float32), y=np.arange(6) % 3),
    "3-D x": dict(x=_images(6, 8, 8)[..., 0], y=np.arange(6) % 3),
    "tiny images": dict(x=_images(6, 4, 4), y=np.arange(6) % 3),
    "two channels": dict(x=_images(6, 8, 8, 2), y=np.arange(6) % 3),
    "float y": dict(x=_images(6, 8, 8), y=(np.arange(6) % 3).astype(float)),
    "length mismatch": dict(x=_images(6, 8, 8), y=np.arange(5) % 3),
    "negative label": dict(x=_images(6, 8, 8), y=np.array([0, 1, 2, 0, 1, -1])),
    "no images": dict(x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0, np.int64)),
    "empty class": dict(x=_images(6, 8, 8), y=np.array([0, 0, 2, 2, 0, 2])),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_npz_validation_errors(tmp_path, case):
    _good_npz(tmp_path)
    _write(tmp_path / "train.npz", **BAD_TRAIN[case])
    with pytest.raises(DataError, match="train.npz"):
        load_dataset("npz", tmp_path)


def test_npz_test_label_out_of_range_and_corrupt_and_missing(tmp_path):
    _good_npz(tmp_path)
    _write(tmp_path / "test.npz", x=_images(4, 8, 8), y=np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match="test.npz"):
        load_dataset("npz", tmp_path)
    (tmp_path / "test.npz").write_bytes(b"PK\x03\x04 definitely not a zip file")
    with pytest.raises(DataError, match="test.npz"):
        load_dataset("npz", tmp_path)
    os.remove(tmp_path / "test.npz")
    with pytest.raises(DataError, match="test.npz"):
        load_dataset("npz", tmp_path)


def test_unknown_dataset():
    with pytest.raises(UsageError, match="cifar10lt"):
        load_dataset("mnist-lt", "/nonexistent")


def test_missing_cifar_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10lt", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar10" / "train.npz") in msg and "--download" in msg and "\n" not in msg


def test_cifar100lt_from_small_cache(tmp_path):
    rng = np.random.RandomState(0)
    y_train = np.repeat(np.arange(100), 10)
    rng.shuffle(y_train)
    x_train = rng.randint(0, 256, size=(1000, 8, 8, 3), dtype=np.uint8)
    y_test = np.repeat(np.arange(100), 2)
    x_test = rng.randint(0, 256, size=(200, 8, 8, 3), dtype=np.uint8)
    _write(tmp_path / "cifar100" / "train.npz", x=x_train, y=y_train)
    _write(tmp_path / "cifar100" / "test.npz", x=x_test, y=y_test)
    d = load_dataset("cifar100lt", tmp_path, ur=10, seed=0)
    ref = ldam_reference(y_train, 10, seed=0)
    assert d.num_classes == 100 and len(d.class_names) == 100 and d.default_eps == pytest.approx(8 / 255)
    assert d.train_counts.tolist() == [int(10.0 * 0.1 ** (c / 99.0)) for c in range(100)]
    assert np.array_equal(d.x_train, x_train[ref]) and np.array_equal(d.y_train, y_train[ref])
    assert np.array_equal(d.x_test, x_test) and np.array_equal(d.y_test, y_test)
    full = load_dataset("cifar100", tmp_path)
    assert full.train_counts.tolist() == [10] * 100
    bs = load_dataset("cifar100-bs", tmp_path, ur=10)
    assert len(bs.y_train) == len(d.y_train) and bs.train_counts.max() - bs.train_counts.min() <= 1


@needs_real
def test_real_cifar10lt():
    d = load_dataset("cifar10lt", REAL, ur=50)
    assert d.train_counts.tolist() == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    assert d.x_train.shape == (13996, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"


def test_tinyimagenetlt_image_folder_and_cache(tmp_path):
    from PIL import Image

    root = tmp_path / "tinyimagenet"
    names = ["n01", "n02", "n03", "n04"]
    rng = np.random.RandomState(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{k}.png")
    d = load_dataset("tinyimagenetlt", tmp_path, ur=3)
    # linear profile from n_max = 6 down to 6 / 3 = 2
    assert d.train_counts.tolist() == [6, 4, 3, 2]
    assert d.class_names == names and d.default_eps == pytest.approx(2 / 255)
    assert d.x_train.dtype == np.uint8 and d.x_train.shape[1:] == (8, 8, 3) and len(d.y_test) == 8
    first = np.asarray(Image.open(root / "val" / "n01" / "0.png"))
    assert np.array_equal(d.x_test[0], first)
    assert sorted(os.listdir(root)) == ["test.npz", "train", "train.npz", "val"]  # no temp files left
    for p in (root / "val").rglob("*.png"):
        p.unlink()
    again = load_dataset("tinyimagenetlt", tmp_path, ur=3)  # now read from the cache
    assert np.array_equal(again.x_train, d.x_train) and np.array_equal(again.x_test, d.x_test)

"""Datasets as uint8 arrays: CIFAR-10/100 (balanced, long-tailed, balanced-small),
Tiny-ImageNet-LT and a user's own ``npz`` files.

Every builder is registered in ``DATASETS`` and called as
``builder(data_dir=..., ur=..., seed=..., download=...)``; use ``load_dataset``.

Array cache: ``{data_dir}/{cifar10|cifar100|tinyimagenet}/{train,test}.npz`` with ``x`` uint8
[N, H, W, C] and ``y`` int64 [N]; read when present, otherwise built from the raw files
(torchvision for CIFAR, an ImageFolder tree for Tiny-ImageNet) and written atomically.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from art_reat.data.longtail import balanced_small_indices, long_tailed_indices
from art_reat.errors import DataError
from art_reat.registry import Registry

DATASETS: Registry[Callable[..., "DatasetSplits"]] = Registry("dataset")

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach
couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()

Arrays = Tuple[np.ndarray, np.ndarray]


@dataclass
class DatasetSplits:
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    class_names: List[str]
    default_eps: float

    @property
    def train_counts(self) -> np.ndarray:
        return np.bincount(self.y_train, minlength=self.num_classes)


def load_dataset(
    name: str, data_dir: str, ur: float = 100.0, seed: int = 0, download: bool = False
) -> DatasetSplits:
    """Load a registered dataset (``ur`` and ``seed`` only matter for the LT / BS variants)."""
    return DATASETS.get(name)(data_dir=str(data_dir), ur=ur, seed=seed, download=download)


# ----------------------------------------------------------------------------- npz i/o


def validate_arrays(x, y, source: str, num_classes: Optional[int] = None, train: bool = False) -> Arrays:
    """Check an (x, y) pair; return (x, y as int64). Raises DataError naming ``source``."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(
            f"{source}: x must be uint8 [N, H, W, C], got {getattr(x, 'dtype', type(x))} "
            f"with shape {getattr(x, 'shape', '?')}"
        )
    n, h, w, c = x.shape
    if h < 8 or w < 8 or c not in (1, 3):
        raise DataError(f"{source}: x has shape {x.shape}; need H, W >= 8 and C in {{1, 3}} (NHWC)")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"{source}: y must be a 1-D integer array, got {getattr(y, 'dtype', type(y))} "
            f"with shape {getattr(y, 'shape', '?')}"
        )
    if len(y) != n or n == 0:
        raise DataError(f"{source}: x has {n} images but y has {len(y)} labels (need the same, > 0)")
    y = y.astype(np.int64)
    limit = num_classes if num_classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= limit:
        raise DataError(f"{source}: labels must lie in [0, {limit}), found {y.min()}..{y.max()}")
    if train:
        empty = np.flatnonzero(np.bincount(y, minlength=limit) == 0)
        if len(empty):
            raise DataError(f"{source}: class(es) {empty.tolist()[:10]} have no training images")
    return x, y


def read_npz(path: str, num_classes: Optional[int] = None, train: bool = False) -> Arrays:
    """Read and validate an npz file with arrays ``x`` and ``y``."""
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} (need x and y)")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as e:  # zip, pickle, truncation errors: all mean a corrupt file
        raise DataError(f"cannot read {path} (corrupt or not an npz file): {type(e).__name__}: {e}") from None
    return validate_arrays(x, y, path, num_classes, train)


def write_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write ``x``, ``y`` atomically (temporary file in the same folder + os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y.astype(np.int64))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cached(path: str, num_classes: Optional[int], train: bool, build: Callable[[], Arrays]) -> Arrays:
    if os.path.isfile(path):
        return read_npz(path, num_classes, train)
    x, y = validate_arrays(*build(), source=f"raw data for {path}", num_classes=num_classes, train=train)
    try:
        write_npz(path, x, y)
    except OSError as e:
        warnings.warn(f"could not write the array cache {path}: {e}")
    return x, y


# ----------------------------------------------------------------------------- CIFAR


def _cifar(kind: str, data_dir: str, train: bool, download: bool) -> Arrays:
    num_classes = 10 if kind == "cifar10" else 100
    path = os.path.join(data_dir, kind, "train.npz" if train else "test.npz")
    raw = os.path.join(data_dir, "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")

    def build() -> Arrays:
        if not download and not os.path.isdir(raw):
            raise DataError(f"missing {path} (and no {raw}): rerun with --download to fetch {kind}")
        from torchvision import datasets as tvd

        cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
        try:
            ds = cls(root=data_dir, train=train, download=download)
        except Exception as e:
            hint = "" if download else "; rerun with --download to fetch it again"
            raise DataError(f"cannot load {kind} from {raw}: {e}{hint}") from None
        return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)

    return _cached(path, num_classes, train, build)


def _register_cifar(kind: str, variant: str) -> None:
    name = kind + {"lt": "lt", "full": "", "bs": "-bs"}[variant]

    @DATASETS.register(name)
    def builder(data_dir: str, ur: float = 100.0, seed: int = 0, download: bool = False) -> DatasetSplits:
        num_classes = 10 if kind == "cifar10" else 100
        x_tr, y_tr = _cifar(kind, data_dir, True, download)
        x_te, y_te = _cifar(kind, data_dir, False, download)
        if variant == "lt":
            idx = long_tailed_indices(y_tr, ur, seed, "exp", num_classes)
        elif variant == "bs":
            idx = balanced_small_indices(y_tr, ur, seed, "exp", num_classes)
        else:
            idx = None
        if idx is not None:
            x_tr, y_tr = x_tr[idx], y_tr[idx]
        names = CIFAR10_CLASSES if kind == "cifar10" else CIFAR100_CLASSES
        return DatasetSplits(x_tr, y_tr, x_te, y_te, num_classes, name, list(names), 8 / 255)


for _kind in ("cifar10", "cifar100"):
    for _variant in ("lt", "full", "bs"):
        _register_cifar(_kind, _variant)


# ----------------------------------------------------------------------------- Tiny-ImageNet-LT


def _image_folder(folder: str) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(folder)
    except Exception as e:
        raise DataError(f"cannot read the image folder {folder}: {e}") from None
    xs = []
    for path, _ in ds.samples:
        try:
            with Image.open(path) as im:
                xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    if len({a.shape for a in xs}) != 1:
        raise DataError(f"{folder}: images have different sizes; resize them to one size first")
    return np.stack(xs), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


@DATASETS.register("tinyimagenetlt")
def tinyimagenetlt(data_dir: str, ur: float = 100.0, seed: int = 0, download: bool = False) -> DatasetSplits:
    """``data_dir/tinyimagenet/{train,val}/<class>/*.JPEG`` (val rearranged into class folders,
    the same class folders as train), cached as ``data_dir/tinyimagenet/{train,test}.npz``;
    linear LT profile on train. ``download`` is not supported."""
    root = os.path.join(data_dir, "tinyimagenet")
    train_dir = os.path.join(root, "train")
    classes: List[str] = []

    def from_folder(folder: str) -> Callable[[], Arrays]:
        def build() -> Arrays:
            if not os.path.isdir(folder):
                raise DataError(
                    f"missing {folder}: Tiny-ImageNet cannot be downloaded automatically; "
                    f"place the images as {root}/{{train,val}}/<class>/*.JPEG"
                )
            x, y, names = _image_folder(folder)
            if classes and names != classes:
                raise DataError(f"{folder}: class folders differ from those in {train_dir}")
            classes[:] = names
            return x, y

        return build

    x_tr, y_tr = _cached(os.path.join(root, "train.npz"), None, True, from_folder(train_dir))
    num_classes = int(y_tr.max()) + 1
    x_te, y_te = _cached(os.path.join(root, "test.npz"), num_classes, False, from_folder(os.path.join(root, "val")))
    if not classes and os.path.isdir(train_dir):  # loaded from the cache: names from the folders
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if len(classes) != num_classes:
        classes = [str(i) for i in range(num_classes)]
    idx = long_tailed_indices(y_tr, ur, seed, "linear", num_classes)
    return DatasetSplits(x_tr[idx], y_tr[idx], x_te, y_te, num_classes, "tinyimagenetlt", classes, 2 / 255)


# ----------------------------------------------------------------------------- user npz


@DATASETS.register("npz")
def npz(data_dir: str, ur: float = 100.0, seed: int = 0, download: bool = False) -> DatasetSplits:
    """A user's own data: ``data_dir/train.npz`` and ``data_dir/test.npz`` (arrays ``x`` uint8
    NHWC, ``y`` integer labels 0..C-1), used as they are (``ur`` is ignored)."""
    x_tr, y_tr = read_npz(os.path.join(data_dir, "train.npz"), None, True)
    num_classes = int(y_tr.max()) + 1
    x_te, y_te = read_npz(os.path.join(data_dir, "test.npz"), num_classes, False)
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise DataError(
            f"{os.path.join(data_dir, 'test.npz')}: images are {x_te.shape[1:]}, train images are {x_tr.shape[1:]}"
        )
    names = [str(i) for i in range(num_classes)]
    return DatasetSplits(x_tr, y_tr, x_te, y_te, num_classes, "npz", names, 8 / 255)

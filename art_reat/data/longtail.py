"""Long-tailed subsets exactly as LDAM-DRW / RoBal / REAT build them (SPEC section 1).

Profiles
--------
``exp`` (CIFAR-10-LT / CIFAR-100-LT)::

    N_c = int(n_max * (1 / ur) ** (c / (C - 1)))

``linear`` (Tiny-ImageNet-LT, 500 down to 5 for UR=100): the counts fall on a straight
line from ``n_max`` (class 0) to ``n_max / ur`` (class C-1), truncated like ``exp``::

    N_c = int(n_max - (n_max - n_max / ur) * c / (C - 1))

Both profiles give ``int(n_max)`` images to class 0 and ``int(n_max / ur)`` to the last one.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from art_reat.errors import UsageError

PROFILES = ("exp", "linear")
GROUP_RULES = ("reference", "paper")


def long_tailed_counts(n_max: float, num_classes: int, ur: float, profile: str = "exp") -> List[int]:
    """Number of images kept per class, class 0 (the largest) first."""
    ur = float(ur)
    if not math.isfinite(ur) or ur < 1:
        raise UsageError(f"imbalance ratio ur={ur:g} is not allowed: use a number >= 1 (1 = balanced)")
    if profile not in PROFILES:
        raise UsageError(f"unknown long-tail profile '{profile}': choose one of {', '.join(PROFILES)}")
    if num_classes < 1:
        raise UsageError(f"num_classes={num_classes} is not allowed: use at least 1 class")
    n_max = float(n_max)
    if num_classes == 1:
        return [int(n_max)]
    last = num_classes - 1
    if profile == "exp":
        counts = [int(n_max * (1.0 / ur) ** (c / last)) for c in range(num_classes)]
    else:
        counts = [int(n_max - (n_max - n_max / ur) * c / last) for c in range(num_classes)]
    if counts[-1] < 1:
        raise UsageError(
            f"ur={ur:g} leaves the smallest class with {counts[-1]} images "
            f"(n_max={n_max:g}): use ur <= {n_max:g}"
        )
    return counts


def _num_classes(targets: np.ndarray, num_classes: Optional[int]) -> int:
    if targets.ndim != 1 or targets.size == 0:
        raise UsageError("targets must be a non-empty 1-D array of class ids")
    return int(targets.max()) + 1 if num_classes is None else int(num_classes)


def long_tailed_indices(
    targets, ur: float, seed: int = 0, profile: str = "exp", num_classes: Optional[int] = None
) -> np.ndarray:
    """Original indices of the long-tailed subset, class 0 first (the LDAM-DRW construction).

    ``n_max = len(targets) / C``; one RandomState(seed) (same stream as ``np.random.seed(seed)``,
    but the global RNG is left alone) shuffles each class's indices in ascending class order and
    the first N_c are kept.
    """
    targets = np.asarray(targets)
    C = _num_classes(targets, num_classes)
    counts = long_tailed_counts(len(targets) / C, C, ur, profile)
    return _per_class_take(targets, counts, seed)


def balanced_small_indices(
    targets, ur: float, seed: int = 0, profile: str = "exp", num_classes: Optional[int] = None
) -> np.ndarray:
    """Balanced control with as many images as the long-tailed set, split equally over the
    classes (the remainder goes to the first classes), same seeded per-class shuffle."""
    targets = np.asarray(targets)
    C = _num_classes(targets, num_classes)
    total = sum(long_tailed_counts(len(targets) / C, C, ur, profile))
    counts = [total // C + (1 if c < total % C else 0) for c in range(C)]
    return _per_class_take(targets, counts, seed)


def _per_class_take(targets: np.ndarray, counts: List[int], seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    blocks = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        blocks.append(idx[:n_c])
    return np.concatenate(blocks).astype(np.int64)


def class_groups(num_classes: int, rule: str = "reference") -> Dict[str, List[int]]:
    """Head / body / tail class ids (0-based; classes sorted from largest to smallest).

    Both rules: head = the first floor(C/3) classes.
    ``paper``: tail = classes ceil(2C/3)..C counted from 1, i.e. 0-based ceil(2C/3)-1 .. C-1
    (C=10: {6,7,8,9}; C=100: 66..99).
    ``reference`` (released code, default): tail = range(C // 3 * 2 + 1, C)
    (C=10: {7,8,9}; C=100: 67..99).
    Body = every class that is neither head nor tail.
    """
    if rule not in GROUP_RULES:
        raise UsageError(f"unknown class-group rule '{rule}': choose one of {', '.join(GROUP_RULES)}")
    C = int(num_classes)
    if C < 1:
        raise UsageError(f"num_classes={C} is not allowed: use at least 1 class")
    head = list(range(C // 3))
    tail_start = C // 3 * 2 + 1 if rule == "reference" else -(-2 * C // 3) - 1
    tail = list(range(max(tail_start, len(head)), C))
    body = [c for c in range(C) if c not in head and c not in tail]
    return {"head": head, "body": body, "tail": tail}

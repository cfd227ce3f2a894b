"""Seeded, per-class (stratified) splits and subsets. Returned indices are sorted ascending."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from art_reat.errors import UsageError


def stratified_split(targets, fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n_c)`` images of every class c (at least 1, at most n_c - 1
    when fraction > 0). Returns (keep_idx, held_idx), disjoint, sorted, int64."""
    targets = np.asarray(targets)
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"held-out fraction {fraction:g} is not allowed: use 0 <= fraction < 1")
    if fraction == 0.0:
        return np.arange(len(targets), dtype=np.int64), np.zeros(0, dtype=np.int64)
    rng = np.random.RandomState(seed)
    keep, held = [], []
    for c in np.unique(targets):
        idx = np.where(targets == c)[0]
        if len(idx) < 2:
            raise UsageError(
                f"class {c} has {len(idx)} image(s): a stratified split needs at least 2 per class"
            )
        rng.shuffle(idx)
        n_held = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)).astype(np.int64), np.sort(np.concatenate(held)).astype(np.int64)


def stratified_subset(targets, n: int, seed: int = 0, num_classes: Optional[int] = None) -> np.ndarray:
    """``n // C`` seeded random images per class (the remainder to the first classes),
    C = ``num_classes`` or max(targets) + 1. Sorted int64 indices."""
    targets = np.asarray(targets)
    if targets.ndim != 1 or targets.size == 0:
        raise UsageError("targets must be a non-empty 1-D array of class ids")
    C = int(targets.max()) + 1 if num_classes is None else int(num_classes)
    n = int(n)
    if n < 1 or n > len(targets):
        raise UsageError(f"subset size n={n} is not allowed: use 1 <= n <= {len(targets)}")
    rng = np.random.RandomState(seed)
    out = []
    for c in range(C):
        want = n // C + (1 if c < n % C else 0)
        idx = np.where(targets == c)[0]
        if len(idx) < want:
            counts = np.bincount(targets, minlength=C)[:C]
            m = int(counts.min())
            limit = C * m + int(np.argmax(np.append(counts, m) == m))
            raise UsageError(
                f"subset size n={n} needs {want} images of class {c}, which has {len(idx)}: "
                f"the maximum here is n={limit}"
            )
        rng.shuffle(idx)
        out.append(idx[:want])
    return np.sort(np.concatenate(out)).astype(np.int64)


def proportional_subset(targets, n: int, seed: int = 0, num_classes: Optional[int] = None) -> np.ndarray:
    """``n`` seeded random images keeping each class's share (at least one per class), so that a
    subset of a long-tailed set is long-tailed too. Shares are rounded by largest remainder.
    Sorted int64 indices."""
    targets = np.asarray(targets)
    if targets.ndim != 1 or targets.size == 0:
        raise UsageError("targets must be a non-empty 1-D array of class ids")
    C = int(targets.max()) + 1 if num_classes is None else int(num_classes)
    counts = np.bincount(targets, minlength=C)[:C]
    present = int((counts > 0).sum())
    n = int(n)
    if not present <= n <= len(targets):
        raise UsageError(f"subset size n={n} is not allowed: use {present} <= n <= {len(targets)} "
                         f"(at least one image per class)")
    # one image per present class first, the rest shared in proportion to the remaining images
    base = (counts > 0).astype(np.int64)
    share = (n - present) * (counts - base) / max(int((counts - base).sum()), 1)
    want = base + np.floor(share).astype(np.int64)
    remainder = share - np.floor(share)
    for c in np.argsort(-remainder, kind="stable")[: n - int(want.sum())]:
        want[c] += 1
    rng = np.random.RandomState(seed)
    out = []
    for c in range(C):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        out.append(idx[: want[c]])
    return np.sort(np.concatenate(out)).astype(np.int64)

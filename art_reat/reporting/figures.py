"""The paper's figures as PNG files, from plain arrays (no MLflow here; `report.py` extracts the data).

Every function writes one PNG to `path` and returns it. Matplotlib is used through its object API
(`Figure` + Agg canvas), so no display and no global backend switch are involved.

- `adv_pred_distribution_figure`: share of the training adversarial examples predicted as each
  class, over epochs (Figs. 1, 5, 6, 11); one panel per method.
- `per_class_accuracy_figure`: clean and robust accuracy per class (Fig. 4b).
- `attack_steps_figure`: robust accuracy against PGD steps (Fig. 4a).
- `ae_distance_figure`: L2 distance between the adversarial examples of the same images in
  consecutive epochs (Fig. 3).
- `tsne_figure` / `tsne_scatter_figure`: t-SNE of penultimate features of adversarial test
  examples, coloured by class, head / body / tail marked (Figs. 2, 7, 10).
- `training_cost_figure`: seconds per epoch per method (Table 14).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

Groups = Mapping[str, Sequence[int]]
GROUP_STYLE = {"head": ("o", "-"), "body": ("s", "--"), "tail": ("^", ":")}


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _group_of(c: int, groups: Optional[Groups]) -> Optional[str]:
    for name, members in (groups or {}).items():
        if c in members:
            return name
    return None


def _class_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def adv_pred_distribution_figure(counts: Mapping[str, np.ndarray], path, groups: Optional[Groups] = None,
                                 train_counts: Optional[Sequence[float]] = None) -> Path:
    """`counts[label]`: [epochs, C] numbers (or shares) of training AEs predicted as each class.
    One panel per label; a line per class (head solid, body dashed, tail dotted); the share of each
    class in the training set, when given, as grey ticks on the right."""
    from matplotlib.ticker import MaxNLocator

    labels = list(counts)
    ncols = min(max(len(labels), 1), 3)
    nrows = math.ceil(max(len(labels), 1) / ncols)
    fig = _figure(5.0 * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes, labels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        data = np.asarray(counts[label], dtype=np.float64)
        if data.ndim != 2 or data.size == 0:
            continue
        share = data / np.clip(data.sum(axis=1, keepdims=True), 1e-12, None)
        epochs = np.arange(1, share.shape[0] + 1)
        colors = _class_colors(share.shape[1])
        for c in range(share.shape[1]):
            style = GROUP_STYLE.get(_group_of(c, groups) or "", ("o", "-"))[1]
            ax.plot(epochs, share[:, c], style, color=colors[c], label=f"class {c}", marker="." if len(epochs) < 30 else None)
        if train_counts is not None:
            prior = np.asarray(train_counts, dtype=np.float64)
            prior = prior / prior.sum()
            for c, p in enumerate(prior[: share.shape[1]]):
                ax.axhline(p, color=colors[c], alpha=0.25, linewidth=0.8)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("share of training AEs predicted as class")
    if labels:
        last = axes[len(labels) - 1]
        last.legend(fontsize="x-small", ncol=2 if len(last.lines) > 8 else 1, loc="best")
    return _save(fig, path)


def per_class_accuracy_figure(accuracy: Mapping[str, Mapping[str, Sequence[float]]], path,
                              groups: Optional[Groups] = None) -> Path:
    """`accuracy[label] = {"clean": [C], "robust": [C]}` (fractions); two panels, bars per label."""
    kinds = ["clean", "robust"]
    labels = list(accuracy)
    num_classes = max((len(v) for a in accuracy.values() for v in a.values()), default=0)
    fig = _figure(min(max(6.4, 0.3 * num_classes * max(len(labels), 1) + 3), 24.0), 6.0)
    axes = fig.subplots(2, 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(labels), 1)
    x = np.arange(num_classes)
    for ax, kind in zip(axes, kinds):
        for i, label in enumerate(labels):
            values = np.asarray(accuracy[label].get(kind, []), dtype=np.float64) * 100
            if values.size:
                ax.bar(x[: values.size] + (i - (len(labels) - 1) / 2) * width, values, width, label=label)
        ax.set_ylabel(f"{kind} accuracy (%)")
        ticks = x if num_classes <= 20 else x[:: max(num_classes // 20, 1)]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{c}\n{(_group_of(int(c), groups) or '')[:1]}" for c in ticks], fontsize="small")
        for c in x:
            if _group_of(int(c), groups) == "tail":
                ax.axvspan(c - 0.5, c + 0.5, color="grey", alpha=0.08)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("class (h: head, b: body, t: tail; tail shaded)")
    return _save(fig, path)


def attack_steps_figure(curves: Mapping[str, Mapping[int, float]], path) -> Path:
    """`curves[label] = {steps: robust accuracy}` (fractions): accuracy against PGD steps."""
    fig = _figure()
    ax = fig.subplots()
    for label, points in curves.items():
        steps = sorted(points)
        ax.plot(steps, [100 * points[s] for s in steps], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("PGD steps")
    ax.set_ylabel("robust accuracy (%)")
    all_steps = sorted({s for p in curves.values() for s in p})
    if all_steps:
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
    ax.legend(fontsize="small")
    return _save(fig, path)


def ae_distance_figure(curves: Mapping[str, Sequence[Tuple[int, float]]], path) -> Path:
    """`curves[label] = [(epoch, distance)]`: mean L2 distance between consecutive epochs' AEs."""
    fig = _figure()
    ax = fig.subplots()
    for label, points in curves.items():
        if points:
            epochs, values = zip(*points)
            ax.plot([e + 1 for e in epochs], values, marker="." if len(points) < 30 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean L2 distance to the previous epoch's AE")
    ax.legend(fontsize="small")
    return _save(fig, path)


def training_cost_figure(seconds: Mapping[str, Tuple[float, Optional[float]]], path) -> Path:
    """`seconds[label] = (mean, standard error or None)`: seconds per epoch, one bar per label."""
    fig = _figure(max(4.0, 1.2 * len(seconds) + 2), 4.0)
    ax = fig.subplots()
    labels = list(seconds)
    means = [seconds[k][0] for k in labels]
    errors = [seconds[k][1] or 0.0 for k in labels]
    bars = ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="tab:blue")
    for bar, mean in zip(bars, means):
        if not math.isnan(mean):
            ax.annotate(f"{mean:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize="small")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize="small")
    ax.set_ylabel("seconds per epoch")
    return _save(fig, path)


def tsne_scatter_figure(embedding: np.ndarray, y: np.ndarray, path, groups: Optional[Groups] = None,
                        title: Optional[str] = None) -> Path:
    """2-D points coloured by class; head circles, body squares, tail triangles with a black edge."""
    embedding, y = np.asarray(embedding), np.asarray(y)
    num_classes = int(y.max()) + 1 if y.size else 0
    colors = _class_colors(max(num_classes, 1))
    fig = _figure(6.4, 5.6)
    ax = fig.subplots()
    for c in range(num_classes):
        pick = y == c
        if not pick.any():
            continue
        group = _group_of(c, groups)
        marker = GROUP_STYLE.get(group or "", ("o", "-"))[0]
        ax.scatter(embedding[pick, 0], embedding[pick, 1], s=28 if group == "tail" else 14, marker=marker,
                   color=colors[c], edgecolors="black" if group == "tail" else "none", linewidths=0.5,
                   label=f"{c}" + (f" ({group})" if group else ""))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small", markerscale=1.2, loc="best", ncol=2 if num_classes > 10 else 1)
    return _save(fig, path)


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """scikit-learn t-SNE to 2-D (perplexity capped below the number of points)."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n < 3:
        return np.zeros((n, 2), dtype=np.float32) if n < 2 else np.asarray([[0.0, 0.0], [1.0, 0.0]][:n])
    perplexity = min(float(perplexity), max((n - 1) / 3.0, 1.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def adversarial_features(model, x, y, attack=None, batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """Penultimate features (`model.forward_features(x)[0]`) of `attack.perturb(x, y)` (of x if no attack).

    `x`: uint8 NHWC or float NCHW in [0, 1] (numpy or tensor); the model's device is used."""
    import torch

    device = next(model.parameters()).device
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        x = t.permute(0, 3, 1, 2).float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    was_training = model.training
    model.eval()
    out = []
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, len(labels), batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = labels[start:start + batch_size].to(device)
            if attack is not None:
                xb = attack.perturb(xb, yb, generator=generator)
            with torch.no_grad():
                features = model.forward_features(xb)[0] if hasattr(model, "forward_features") else model.embed(xb)
            out.append(features.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def tsne_figure(model, x, y, attack, groups: Optional[Groups], path="tsne.png", title: Optional[str] = None,
                seed: int = 0, perplexity: float = 30.0) -> Path:
    """t-SNE of the penultimate features of the adversarial examples `attack` makes of (x, y)."""
    features = adversarial_features(model, x, y, attack, seed=seed)
    embedding = tsne_embedding(features, seed=seed, perplexity=perplexity)
    return tsne_scatter_figure(embedding, np.asarray(y), path, groups, title)

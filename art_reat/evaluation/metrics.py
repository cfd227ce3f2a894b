"""Accuracy overall, per class and per head/body/tail group, from predictions on the device."""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class absent from `labels`), float64 on the CPU."""
    pred, labels = pred.cpu(), labels.cpu()
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))


def accuracy_report(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    groups: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, object]:
    """{"overall": float, "per_class": [..], "groups": {"head": float, ...}}.

    Group accuracy is the mean of the group's per-class accuracies, as in the papers (the test sets
    are balanced, so this equals the sample accuracy there).
    """
    per_class = per_class_accuracy(pred, labels, num_classes)
    report: Dict[str, object] = {
        "overall": float((pred.cpu() == labels.cpu()).double().mean()) if len(labels) else float("nan"),
        "per_class": [float(a) for a in per_class],
    }
    if groups:
        report["groups"] = {name: float(per_class[list(cls)].nanmean()) if len(cls) else float("nan")
                            for name, cls in groups.items()}
    return report


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def predict_loader(model: torch.nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                   attack=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predictions (on clean inputs, or on `attack.perturb` outputs) and labels over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    preds, ys = [], []
    try:
        for x, y in loader:
            if attack is not None:
                x = attack.perturb(x, y)
            preds.append(_predict(model, x))
            ys.append(y)
    finally:
        model.train(was_training)
    if not preds:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    return torch.cat(preds), torch.cat(ys)

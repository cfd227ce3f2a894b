"""Long-tailed recognition losses for the outer minimisation (SPEC section 3).

Every loss is an ``nn.Module`` built as ``Loss(train_counts, weight=None, **options)``
and called as ``loss(logits, labels) -> scalar``. ``train_counts`` are the per-class
training counts N_c; constants derived from them are float32 buffers, so
``.to(device)`` moves them and they promote to the logits' dtype (float64 logits give
a float64 loss).

``weight`` (optional, one non-negative value per class) is the hook for deferred
re-weighting: the loss is ``sum_i w_{y_i} * l_i / B`` (a plain batch mean of the
weighted per-sample losses, as in Cui et al.'s reference code), NOT PyTorch's
weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` that ``F.cross_entropy(weight=)``
computes (and that the LDAM-DRW code uses for DRW).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from art_reat.errors import UsageError
from art_reat.losses import LOSSES

__all__ = [
    "validate_counts",
    "balanced_softmax_loss",
    "class_balanced_weights",
    "ldam_margins",
    "LongTailLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "ClassBalancedLoss",
    "LDAMLoss",
    "BalancedSoftmaxLoss",
]

CountsLike = Union[Sequence[float], np.ndarray, torch.Tensor]


def _as_float64(values: CountsLike, what: str) -> torch.Tensor:
    try:
        if isinstance(values, torch.Tensor):
            t = values.detach().to("cpu", torch.float64)
        else:
            t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a 1-D sequence of numbers") from None
    if t.dim() != 1 or t.numel() == 0:
        raise UsageError(f"{what} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise UsageError(f"{what} must be finite, got {t.tolist()}")
    return t


def validate_counts(train_counts: CountsLike) -> torch.Tensor:
    """Per-class training counts N_c as a float64 CPU tensor; UsageError unless 1-D and all > 0."""
    counts = _as_float64(train_counts, "train_counts")
    if not (counts > 0).all():
        raise UsageError(f"train_counts must all be > 0, got {counts.tolist()}")
    return counts


def _validate_weight(weight: Optional[CountsLike], num_classes: int) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    w = _as_float64(weight, "weight")
    if w.numel() != num_classes:
        raise UsageError(f"weight has {w.numel()} entries but there are {num_classes} classes")
    if (w < 0).any():
        raise UsageError(f"weight must be >= 0, got {w.tolist()}")
    return w


def class_balanced_weights(train_counts: CountsLike, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al.'s weights (1 - beta) / (1 - beta^N_c), normalised to sum C (float64)."""
    counts = validate_counts(train_counts)
    if not 0.0 <= beta < 1.0:
        raise UsageError(f"beta must be in [0, 1), got {beta}")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return w / w.sum() * counts.numel()


def ldam_margins(train_counts: CountsLike, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins m_c = max_m * N_c^{-1/4} / max_j N_j^{-1/4} (float64)."""
    m = validate_counts(train_counts).pow(-0.25)
    return m * (max_m / m.max())


def balanced_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, train_counts: CountsLike
) -> torch.Tensor:
    """Balanced softmax: mean CE(logits + log N_c, y)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_counts = validate_counts(train_counts).log().to(dtype).to(logits.device)
    return F.cross_entropy(logits + log_counts, labels)


class LongTailLoss(nn.Module):
    """Base class: holds N_c and the optional per-class ``weight``; subclasses give l_i."""

    def __init__(self, train_counts: CountsLike, weight: Optional[CountsLike] = None) -> None:
        super().__init__()
        counts = validate_counts(train_counts)
        self.num_classes = int(counts.numel())
        self.register_buffer("counts", counts.float())
        w = _validate_weight(weight, self.num_classes)
        self.register_buffer("weight", None if w is None else w.float())

    def per_sample_unweighted(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """w_{y_i} * l_i (or l_i without ``weight``), shape (B,)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise UsageError(
                f"{type(self).__name__} expects logits of shape (B, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        loss = self.per_sample_unweighted(logits, labels)
        if self.weight is not None:
            loss = loss * self.weight[labels]
        return loss

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, labels).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weighted={self.weight is not None}"


@LOSSES.register("ce")
class CrossEntropyLoss(LongTailLoss):
    """Plain cross-entropy (``train_counts`` only fixes the number of classes)."""

    def per_sample_unweighted(self, logits, labels):
        return F.cross_entropy(logits, labels, reduction="none")


@LOSSES.register("focal")
class FocalLoss(LongTailLoss):
    """Focal loss -(1 - p_y)^gamma log p_y, batch mean.

    ``gamma`` defaults to 1.0, the value LDAM-DRW's experiments use for their Focal
    baseline (Lin et al.'s detection default is 2.0). gamma = 0 is exactly CE.
    Note LDAM-DRW's own FocalLoss applies the class weight inside the CE before
    computing p; here ``weight`` multiplies the focal term, like every other loss.
    """

    def __init__(self, train_counts, weight=None, gamma: float = 1.0) -> None:
        super().__init__(train_counts, weight)
        if not gamma >= 0:
            raise UsageError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def per_sample_unweighted(self, logits, labels):
        ce = F.cross_entropy(logits, labels, reduction="none")  # -log p_y
        if self.gamma == 0.0:
            return ce
        one_minus_p = (-torch.expm1(-ce)).clamp_min(0.0)  # 1 - p_y without cancellation
        return one_minus_p.pow(self.gamma) * ce

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


@LOSSES.register("cb")
class ClassBalancedLoss(CrossEntropyLoss):
    """Class-balanced CE, the paper's "EN": CE weighted by Cui et al.'s effective-number
    weights (see ``class_balanced_weights``), reduced as sum_i w_{y_i} CE_i / B like
    Cui et al.'s reference. A user ``weight`` multiplies the class-balanced weights.
    """

    def __init__(self, train_counts, weight=None, beta: float = 0.9999) -> None:
        cb = class_balanced_weights(train_counts, beta)
        user = _validate_weight(weight, cb.numel())
        super().__init__(train_counts, cb if user is None else cb * user)
        self.beta = float(beta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"


@LOSSES.register("ldam")
class LDAMLoss(LongTailLoss):
    """LDAM (Cao et al.): CE(s * (z - m_y e_y), y), m_c from ``ldam_margins``."""

    def __init__(self, train_counts, weight=None, max_m: float = 0.5, s: float = 30.0) -> None:
        super().__init__(train_counts, weight)
        if not max_m >= 0 or not s > 0:
            raise UsageError(f"ldam needs max_m >= 0 and s > 0, got max_m={max_m}, s={s}")
        self.register_buffer("margins", ldam_margins(train_counts, max_m).float())
        self.max_m, self.s = float(max_m), float(s)

    def per_sample_unweighted(self, logits, labels):
        m = self.margins[labels].to(logits.dtype).unsqueeze(1)
        shifted = logits - torch.zeros_like(logits).scatter(1, labels.unsqueeze(1), m)
        return F.cross_entropy(self.s * shifted, labels, reduction="none")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_m={self.max_m}, s={self.s}"


@LOSSES.register("bsl")
class BalancedSoftmaxLoss(LongTailLoss):
    """Balanced softmax (Ren et al.): CE(z + log N_c, y). The paper's main setting."""

    def __init__(self, train_counts, weight=None) -> None:
        super().__init__(train_counts, weight)
        self.register_buffer("log_counts", validate_counts(train_counts).log().float())

    def per_sample_unweighted(self, logits, labels):
        return F.cross_entropy(logits + self.log_counts, labels, reduction="none")

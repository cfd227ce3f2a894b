"""RoBal's training loss (SPEC section 7), as plain tensor functions plus one module.

* :func:`robal_margin_loss`: the class-aware margin loss on the SCALE-1 cosine logits ``z`` of a
  :class:`~art_reat.models.CosineClassifier`: ``m_y = tau_m * log(N_y / N_min) / s + m`` is
  subtracted from the target logit, the logits are multiplied by ``s``, ``tau_b * log(prior)``
  (prior = N_c / sum N) is added, and the cross-entropy is averaged over the batch.
* :func:`trades_kl`: the TRADES term ``beta / B * sum_i KL(softmax(z_nat_i) || softmax(z_adv_i))``.
  RoBal (and the SPEC's notation) applies it to the scale-1 cosine logits z, not to ``s * z``;
  the function itself takes whatever logits it is given. As in TRADES, the gradient flows through
  both arguments (the natural distribution is not detached).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from art_reat.errors import UsageError
from art_reat.losses.longtail import CountsLike, validate_counts

__all__ = ["RoBalMarginLoss", "robal_class_margins", "robal_margin_loss", "trades_kl"]


def _check_hparams(m: float, s: float, tau_b: float, tau_m: float) -> None:
    for name, value in (("m", m), ("s", s), ("tau_b", tau_b), ("tau_m", tau_m)):
        if not math.isfinite(float(value)):
            raise UsageError(f"RoBal {name} must be a finite number, got {value!r}")
    if not float(s) > 0:
        raise UsageError(f"RoBal scale s must be > 0, got {s!r}")


def robal_class_margins(train_counts: CountsLike, m: float = 0.1, s: float = 10.0,
                        tau_m: float = 0.0) -> torch.Tensor:
    """Per-class margins ``m_c = tau_m * log(N_c / N_min) / s + m`` (float64, CPU)."""
    counts = validate_counts(train_counts)
    _check_hparams(m, s, 0.0, tau_m)
    return float(tau_m) * torch.log(counts / counts.min()) / float(s) + float(m)


def _log_prior(train_counts: CountsLike) -> torch.Tensor:
    counts = validate_counts(train_counts)
    return torch.log(counts / counts.sum())


def _check_inputs(cos_logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if cos_logits.dim() != 2 or cos_logits.shape[1] != num_classes:
        raise UsageError(f"RoBal loss expects logits of shape (B, {num_classes}), got {tuple(cos_logits.shape)}")
    if labels.shape != cos_logits.shape[:1]:
        raise UsageError(f"labels of shape {tuple(labels.shape)} do not match logits of shape "
                         f"{tuple(cos_logits.shape)}")


def _margin_ce(cos_logits: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, log_prior: torch.Tensor,
               s: float, tau_b: float) -> torch.Tensor:
    margins = margins.to(cos_logits.device, cos_logits.dtype)
    log_prior = log_prior.to(cos_logits.device, cos_logits.dtype)
    target = F.one_hot(labels, cos_logits.shape[1]).to(cos_logits.dtype)
    z = (cos_logits - target * margins[labels][:, None]) * s + tau_b * log_prior
    return F.cross_entropy(z, labels)


def robal_margin_loss(cos_logits: torch.Tensor, labels: torch.Tensor, train_counts: CountsLike, m: float = 0.1,
                      s: float = 10.0, tau_b: float = 1.2, tau_m: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``CE(s * (z - m_y e_y) + tau_b * log(prior), y)``.

    :param cos_logits: scale-1 cosine logits ``[B, C]`` (``CosineClassifier.cosine``).
    :param train_counts: N_c, for the margins and the prior N_c / sum N.
    Defaults: CIFAR-10-LT (m 0.1, s 10, tau_b 1.2, tau_m 0); CIFAR-100-LT uses m 0.2, tau_b 0.
    """
    _check_hparams(m, s, tau_b, tau_m)
    margins = robal_class_margins(train_counts, m, s, tau_m)
    _check_inputs(cos_logits, labels, margins.numel())
    return _margin_ce(cos_logits, labels, margins, _log_prior(train_counts), float(s), float(tau_b))


class RoBalMarginLoss(nn.Module):
    """:func:`robal_margin_loss` with the per-class constants precomputed as buffers (``.to(device)``)."""

    def __init__(self, train_counts: CountsLike, m: float = 0.1, s: float = 10.0, tau_b: float = 1.2,
                 tau_m: float = 0.0) -> None:
        super().__init__()
        _check_hparams(m, s, tau_b, tau_m)
        self.m, self.s, self.tau_b, self.tau_m = float(m), float(s), float(tau_b), float(tau_m)
        self.register_buffer("margins", robal_class_margins(train_counts, m, s, tau_m).float())
        self.register_buffer("log_prior", _log_prior(train_counts).float())

    @property
    def num_classes(self) -> int:
        return int(self.margins.numel())

    def forward(self, cos_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_inputs(cos_logits, labels, self.num_classes)
        return _margin_ce(cos_logits, labels, self.margins, self.log_prior, self.s, self.tau_b)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, m={self.m:g}, s={self.s:g}, tau_b={self.tau_b:g}, "
                f"tau_m={self.tau_m:g}")


def trades_kl(z_nat: torch.Tensor, z_adv: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``beta / B * sum_i sum_c p_ic (log p_ic - log q_ic)``, p = softmax(z_nat), q = softmax(z_adv).

    TRADES's ``(1/B) * KLDivLoss(reduction="sum")(log_softmax(z_adv), softmax(z_nat))``, times beta.
    In RoBal, z are the scale-1 cosine logits. Gradients flow into both z_nat and z_adv.
    """
    if z_nat.shape != z_adv.shape or z_nat.dim() != 2:
        raise UsageError(f"trades_kl expects two logit tensors of the same shape (B, C), "
                         f"got {tuple(z_nat.shape)} and {tuple(z_adv.shape)}")
    if not math.isfinite(float(beta)):
        raise UsageError(f"TRADES beta must be a finite number, got {beta!r}")
    kl = F.kl_div(F.log_softmax(z_adv, dim=1), F.log_softmax(z_nat, dim=1), reduction="sum", log_target=True)
    return float(beta) * kl / max(z_nat.shape[0], 1)

"""Loss terms of the baselines of issue 8 (SRAT, MART, deferred re-weighting), as tensor functions.

* :func:`supcon_separation_loss`: SRAT's feature-separation term (SPEC section 8), the supervised
  contrastive loss of Khosla et al. (2020) on L2-normalised penultimate features.
* :func:`mart_terms`: MART's boosted adversarial loss and its misclassification-weighted KL term
  (Wang et al., ICLR 2020), written as in the released MART code (same small constants).
* :func:`drw_reduce`: the reduction of a class-weighted long-tail loss under deferred re-weighting.
* The TRADES term is :func:`art_reat.losses.trades_kl` (shared with RoBal).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from art_reat.errors import UsageError

__all__ = ["DRW_REDUCTIONS", "drw_reduce", "mart_terms", "supcon_separation_loss"]

#: Reductions of the deferred re-weighted loss: "weighted-mean" = sum_i w_{y_i} l_i / sum_i w_{y_i}
#: (``F.cross_entropy(weight=)``, what LDAM-DRW's DRW uses), "mean" = sum_i w_{y_i} l_i / B (the
#: project's convention for a loss's ``weight``, as in Cui et al.'s code).
DRW_REDUCTIONS = ("weighted-mean", "mean")


def supcon_separation_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss on the features of a batch (SRAT's feature separation).

    With ``u_i = f_i / ||f_i||``, ``s_ij = u_i . u_j / temperature``, positives
    ``P(i) = {j != i : y_j = y_i}`` and ``A(i) = {j != i}``::

        L = mean over anchors i with |P(i)| > 0 of
            -1/|P(i)| * sum_{p in P(i)} ( s_ip - log sum_{a in A(i)} exp(s_ia) )

    (Khosla et al.'s "L_out"); 0 when no sample of the batch shares its class with another.
    Minimising it pulls same-class features together and pushes different classes apart.
    O(B^2 * K), vectorised.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise UsageError(f"separation loss expects features [B, K] and labels [B], got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise UsageError(f"separation temperature must be a number > 0, got {temperature!r}")
    b = features.shape[0]
    u = F.normalize(features, dim=1)
    sim = u @ u.t() / float(temperature)
    self_mask = torch.eye(b, dtype=torch.bool, device=features.device)
    log_denominator = torch.logsumexp(sim.masked_fill(self_mask, -math.inf), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = torch.where(positives, sim - log_denominator, torch.zeros_like(sim))
    n_pos = positives.sum(dim=1)
    anchors = n_pos > 0
    if not bool(anchors.any()):
        return features.sum() * 0.0  # keeps the graph (and the dtype/device)
    per_anchor = -log_prob.sum(dim=1)[anchors] / n_pos[anchors].to(sim.dtype)
    return per_anchor.mean()


def mart_terms(z_nat: torch.Tensor, z_adv: torch.Tensor, labels: torch.Tensor, beta: float = 6.0,
               adv_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """MART's two terms ``(boosted, robust)``; the training loss is their sum.

    * ``boosted = L(z_adv, y) + mean_i -log(1.0001 - p'_{i, m_i} + 1e-12)``, p' = softmax(z_adv),
      m_i = the most likely wrong class of the adversarial example. ``L`` is ``adv_loss`` (a
      long-tail loss, e.g. BSL) or, when None, CE as in MART.
    * ``robust = beta / B * sum_i KL(p_i || p'_i) * (1.0000001 - p_{i, y_i})``, p = softmax(z_nat),
      KL computed as ``sum_c p_c (log p_c - log(p'_c + 1e-12))`` (the MART code's KLDivLoss).
      Gradients flow through both p and p'.
    """
    if z_nat.shape != z_adv.shape or z_nat.dim() != 2 or labels.shape != z_nat.shape[:1]:
        raise UsageError(f"MART expects two logit tensors [B, C] and labels [B], got {tuple(z_nat.shape)}, "
                         f"{tuple(z_adv.shape)} and {tuple(labels.shape)}")
    if not math.isfinite(float(beta)):
        raise UsageError(f"MART beta must be a finite number, got {beta!r}")
    adv_probs = F.softmax(z_adv, dim=1)
    ce = F.cross_entropy(z_adv, labels) if adv_loss is None else adv_loss(z_adv, labels)
    true_mask = F.one_hot(labels, z_adv.shape[1]).bool()
    wrong = adv_probs.masked_fill(true_mask, -math.inf).argmax(dim=1)
    boosted = ce + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(z_nat, dim=1)
    true_probs = nat_probs.gather(1, labels[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    robust = float(beta) * (kl * (1.0000001 - true_probs)).sum() / max(z_nat.shape[0], 1)
    return boosted, robust


def drw_reduce(per_sample: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor],
               reduction: str = "weighted-mean") -> torch.Tensor:
    """Reduce ``per_sample = w_{y_i} * l_i`` (a `LongTailLoss.per_sample`) over the batch.

    ``weight=None`` or ``reduction="mean"``: the batch mean. ``"weighted-mean"``: divided by
    ``sum_i w_{y_i}`` instead of B, i.e. ``F.cross_entropy(weight=)`` for CE.
    """
    if reduction not in DRW_REDUCTIONS:
        raise UsageError(f"invalid DRW reduction {reduction!r}: must be {' or '.join(DRW_REDUCTIONS)}")
    if weight is None or reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() / weight.to(per_sample.dtype)[labels].sum().clamp_min(1e-12)

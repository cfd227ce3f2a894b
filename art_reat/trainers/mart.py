"""MART (Wang et al., ICLR 2020, "misclassification aware adversarial training") as a `PGDATTrainer`.

Per batch:

1. Training attack (model in eval mode): CE-PGD started at ``x + 0.001 * N(0, I)`` as in the MART
   code (:class:`~art_reat.trainers.trades.NormalStartPGD`).
2. Outer loss (train mode, natural batch first, then adversarial), :func:`~art_reat.losses.mart_terms`:
   ``BCE(z_adv, y) + beta / B * sum_i KL(p_i || p'_i) * (1 - p_{i, y_i})`` with
   ``BCE = L(z_adv, y) - mean_i log(1 - max_{c != y_i} p'_{i, c})``, p = softmax(z_nat),
   p' = softmax(z_adv), ``beta`` = ``--mart-beta`` (6 by default, MART's CIFAR-10 value).

Long-tail losses: ``L`` is the classifier's long-tail loss (``--loss``), i.e. the long-tail loss
replaces the cross-entropy part of MART's boosted CE; ``--loss ce`` is MART itself. The margin
("boosting") term, the KL and its (1 - p_y) weight use the model's plain softmax probabilities,
the distribution the model predicts with: a logit-adjusting loss such as BSL changes only the
term it replaces.
"""

from __future__ import annotations

from typing import Tuple

import torch

from art_reat.losses import mart_terms
from art_reat.trainers.trades import NaturalBatchTrainer


class MARTTrainer(NaturalBatchTrainer):
    """MART with the classifier's long-tail loss inside the boosted CE (see the module docstring);
    ``beta`` = ``--mart-beta`` (the misclassification-aware KL's weight)."""

    beta_option, state_key = "mart-beta", "mart"

    def training_loss(self, x_adv: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        z_nat, z_adv = self.natural_and_adversarial_logits(x_adv)
        boosted, robust = mart_terms(z_nat, z_adv, y, self.beta, adv_loss=self._classifier._loss)
        return boosted + robust, z_adv, {"bce": boosted.detach(), "mart_kl": robust.detach()}


__all__ = ["MARTTrainer"]

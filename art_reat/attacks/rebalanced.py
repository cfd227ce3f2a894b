"""RBL: PGD whose loss re-balances the adversarial examples over classes (SPEC section 4).

`rebalance=` picks the attack loss:

- "reference": the released REAT code, `CE(z, y, weight=w)` with w the RBL weights indexed by the
  TRUE label. With the model in eval mode every sample's loss is independent of the others and a
  positive weight does not change the sign of its input gradient, so sign-gradient PGD produces
  the adversarial examples of plain CE-PGD (exactly in exact arithmetic; in float32, rounding can
  flip the sign of a near-zero gradient entry now and then). It is offered to reproduce the paper,
  not because it moves anything.
- "logit": maximise `CE(z + log w, y)`: classes rarely predicted last epoch (large w) get a
  larger logit in the attack, so the adversarial examples are pushed towards them, which is what
  the paper intends.
- "rw", "rws", "enr": Table 2's true-label weightings by training counts (same caveat as "reference").
- "brw": balanced-softmax logit shift `CE(z + log N_c, y)`.
- "none": plain CE.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from art_reat.attacks.pgd import TensorPGD
from art_reat.errors import UsageError
from art_reat.losses import attack_class_weights, brw_logit_shift, rbl_class_weights

REBALANCE_SCHEMES = ("reference", "logit", "rw", "rws", "enr", "brw", "none")
_WEIGHTED_CE = ("reference", "rw", "rws", "enr")


class RebalancedPGD(TensorPGD):
    """PGD with the re-balanced attack losses of REAT and its Table 2 baselines."""

    attack_params = TensorPGD.attack_params + ["rebalance", "train_counts"]

    def __init__(self, estimator, train_counts: Sequence[int], rebalance: str = "reference", **kwargs) -> None:
        self.rebalance = rebalance
        self.train_counts = np.asarray(train_counts, dtype=np.int64)
        if self.train_counts.ndim != 1 or len(self.train_counts) != estimator.nb_classes:
            raise UsageError(f"train_counts has shape {self.train_counts.shape}: expected one count for each of the "
                             f"{estimator.nb_classes} classes")
        super().__init__(estimator, **kwargs)
        self.class_weights = torch.ones(len(self.train_counts))
        # before the first epoch the prior of predicted counts is the training counts
        self.update_counts(self.train_counts)

    def _check_own_params(self) -> None:
        if self.rebalance not in REBALANCE_SCHEMES:
            raise UsageError(f"invalid rebalance scheme {self.rebalance!r}: choose one of {', '.join(REBALANCE_SCHEMES)}")
        super()._check_own_params()

    def update_counts(self, adv_pred_counts) -> torch.Tensor:
        """Recompute the weights of the chosen scheme from last epoch's predicted-label counts."""
        counts = self.train_counts
        if self.rebalance in ("reference", "logit"):
            weights = rbl_class_weights(counts, _as_numpy(adv_pred_counts))
        elif self.rebalance in ("rw", "rws", "enr"):
            weights = attack_class_weights(self.rebalance, counts)  # training counts only: static
        else:
            weights = torch.ones(len(counts))
        return self.set_class_weights(weights)

    def set_class_weights(self, weights) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if weights.numel() != len(self.train_counts) or not bool((weights > 0).all()):
            raise UsageError(f"class weights must be {len(self.train_counts)} positive numbers, got {weights.tolist()}")
        self.class_weights = weights.to(self.estimator.device)
        return self.class_weights

    @property
    def logit_shift(self) -> Optional[torch.Tensor]:
        if self.rebalance == "logit":
            return self.class_weights.log()
        if self.rebalance == "brw":
            return brw_logit_shift(self.train_counts, device=self.estimator.device)
        return None

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.rebalance in _WEIGHTED_CE:
            # the released code's weighted mean; the normaliser is one positive scalar per batch
            return F.cross_entropy(logits, y, weight=self.class_weights.to(logits.dtype))
        shift = self.logit_shift
        if shift is not None:
            logits = logits + shift.to(logits.dtype)
        return F.cross_entropy(logits, y, reduction="sum")


def _as_numpy(counts) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    return np.asarray(counts)

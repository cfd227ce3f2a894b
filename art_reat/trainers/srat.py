"""SRAT (Wang et al., arXiv 2107.13639; SPEC section 8) as a `PGDATTrainer`.

Adversarial training with a feature-separation loss and deferred re-weighting (DRW). Per batch:

1. Training attack: the usual CE-PGD (model in eval mode, uniform random start).
2. Outer loss (train mode, one forward pass of the adversarial batch giving the penultimate
   features f and the logits z): ``L_base(z, y) + sep_weight * L_sep(f, y)``, with ``L_sep`` the
   supervised-contrastive separation loss (:func:`~art_reat.losses.supcon_separation_loss`,
   temperature ``--sep-temperature``) and ``L_base`` the classifier's long-tail loss (``--loss``:
   ce, focal or ldam as in SRAT; bsl is accepted too; cb is refused because it is already
   class-weighted and DRW would replace its weights).

Deferred re-weighting (``--drw-epoch E``, 0-based epochs): before epoch E the base loss has no
class weights; from epoch E on it uses the class-balanced effective-number weights of LDAM-DRW
(``(1 - beta) / (1 - beta^N_c)``, beta = 0.9999, normalised to sum C) and, at the start of epoch E,
every parameter group's learning rate is multiplied by ``--drw-lr-factor``. The factor composes
with the epoch scheduler: it is applied to the optimiser's current learning rates and to the
scheduler's ``base_lrs``, so chainable schedulers (MultiStepLR, ...) and closed-form ones
(LambdaLR, ...) both keep it for the rest of training. Reduction of the weighted loss
(``--drw-reduction``): "weighted-mean" (default) divides ``sum_i w_{y_i} l_i`` by ``sum_i w_{y_i}``
like ``F.cross_entropy(weight=)`` in the LDAM-DRW code; "mean" divides by B, the project's
convention for a loss's ``weight``.

Defaults resolved from the configuration (:func:`srat_settings`): E = the first LR milestone (as in
LDAM-DRW, where re-weighting starts with the first LR decay; no DRW when there are no milestones);
``drw_lr_factor`` = 1 when E is itself a milestone (the scheduler lowers the LR there already:
lowering it again would compound the decay) and 0.1 otherwise, so that by default the learning rate
drops by 10x exactly once at E. Both are recorded in the checkpoints and logged.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from art_reat.distributed import gather_batch
from art_reat.errors import UsageError
from art_reat.losses import DRW_REDUCTIONS, class_balanced_weights, drw_reduce, supcon_separation_loss
from art_reat.losses.longtail import LongTailLoss
from art_reat.trainers.pgd_at import PGDATTrainer

#: base losses SRAT accepts (SRAT's own: ce, focal, ldam)
SRAT_LOSSES = ("ce", "focal", "ldam", "bsl")
#: LDAM-DRW's beta of the class-balanced DRW weights
DRW_BETA = 0.9999


def srat_settings(config) -> Dict[str, object]:
    """SRAT's options from a `TrainConfig`, with the defaults of the module docstring resolved."""
    milestones = sorted(int(m) for m in config.milestones)
    drw_epoch = getattr(config, "drw_epoch", None)
    if drw_epoch is None:
        drw_epoch = milestones[0] if milestones else None
    factor = getattr(config, "drw_lr_factor", None)
    if factor is None:
        factor = 1.0 if drw_epoch in milestones else 0.1
    return dict(sep_weight=float(getattr(config, "sep_weight", 1.0)),
                temperature=float(getattr(config, "sep_temperature", 0.1)),
                drw_epoch=drw_epoch, drw_lr_factor=float(factor),
                drw_reduction=getattr(config, "drw_reduction", "weighted-mean"))


class SRATTrainer(PGDATTrainer):
    """PGD-AT + feature separation + deferred re-weighting (see the module docstring).

    :param train_counts: N_c, for the DRW weights.
    :param sep_weight: weight of the separation loss (0 switches it off).
    :param temperature: of the separation loss.
    :param drw_epoch: first epoch (0-based) with class weights; None: no re-weighting.
    :param drw_lr_factor: learning-rate factor applied at ``drw_epoch``.
    :param drw_reduction: "weighted-mean" or "mean".
    Other keyword arguments go to `PGDATTrainer`.
    """

    def __init__(self, classifier, *, train_counts, sep_weight: float = 1.0, temperature: float = 0.1,
                 drw_epoch: Optional[int] = None, drw_lr_factor: float = 0.1,
                 drw_reduction: str = "weighted-mean", drw_beta: float = DRW_BETA, **kwargs) -> None:
        loss = classifier._loss
        if not isinstance(loss, LongTailLoss):
            raise UsageError(f"SRAT needs a long-tail loss module ({', '.join(SRAT_LOSSES)}), got {type(loss).__name__}")
        if loss.weight is not None:
            raise UsageError("SRAT's base loss must not be class-weighted already (e.g. cb): deferred re-weighting "
                             "sets the weights; use ce, focal, ldam or bsl")
        if not hasattr(classifier.model, "forward_features"):
            raise UsageError(f"SRAT needs the penultimate features: model {type(classifier.model).__name__} has no "
                             f"forward_features(x)")
        if not (math.isfinite(float(sep_weight)) and float(sep_weight) >= 0):
            raise UsageError(f"invalid sep-weight {sep_weight!r}: must be a number >= 0")
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise UsageError(f"invalid sep-temperature {temperature!r}: must be a number > 0")
        if drw_epoch is not None and not (isinstance(drw_epoch, int) and drw_epoch >= 0):
            raise UsageError(f"invalid drw-epoch {drw_epoch!r}: must be an integer >= 0")
        if not (math.isfinite(float(drw_lr_factor)) and 0 < float(drw_lr_factor) <= 1):
            raise UsageError(f"invalid drw-lr-factor {drw_lr_factor!r}: must be a number in (0, 1]")
        if drw_reduction not in DRW_REDUCTIONS:
            raise UsageError(f"invalid drw-reduction {drw_reduction!r}: must be {' or '.join(DRW_REDUCTIONS)}")
        super().__init__(classifier, **kwargs)
        self.sep_weight, self.temperature = float(sep_weight), float(temperature)
        self.drw_epoch, self.drw_lr_factor, self.drw_reduction = drw_epoch, float(drw_lr_factor), drw_reduction
        self.drw_weights = class_balanced_weights(train_counts, drw_beta).float()
        if self.drw_weights.numel() != loss.num_classes:
            raise UsageError(f"train_counts has {self.drw_weights.numel()} classes, the loss {loss.num_classes}")
        self.drw_active = False

    # ----------------------------------------------------------------------------- deferred re-weighting
    def set_drw(self, active: bool, lower_lr: bool = False) -> None:
        """Switch the class weights of the base loss on or off; ``lower_lr`` also applies the LR factor."""
        loss = self._classifier._loss
        loss.weight = self.drw_weights.to(loss.counts.device) if active else None
        if active and lower_lr and self.drw_lr_factor != 1.0:
            for group in self._classifier.optimizer.param_groups:
                group["lr"] *= self.drw_lr_factor
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [lr * self.drw_lr_factor for lr in self.scheduler.base_lrs]
        self.drw_active = bool(active)

    def on_epoch_start(self, epoch: int) -> None:
        if self.drw_epoch is not None and epoch >= self.drw_epoch and not self.drw_active:
            self.set_drw(True, lower_lr=True)

    def base_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._classifier._loss
        return drw_reduce(loss.per_sample(logits, y), y, loss.weight, self.drw_reduction)

    def training_loss(self, x_adv: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        features, logits = self._classifier.model.forward_features(x_adv)
        base = self.base_loss(logits, y)
        if self.sep_weight > 0:
            # several processes: the separation loss couples the samples, so it is computed on the
            # all-gathered global batch (as in one process)
            shard = getattr(self._classifier, "batch_shard", None)
            all_features, all_y = gather_batch(features, shard, self.dist), gather_batch(y, shard, self.dist)
            sep = self.sep_weight * supcon_separation_loss(all_features, all_y, self.temperature)
        else:
            sep = torch.zeros((), device=logits.device, dtype=logits.dtype)
        return base + sep, logits, {"lt": base.detach(), "sep": sep.detach()}

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        return {"drw/active": float(self.drw_active)}

    # ----------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict:
        return {"srat": {"sep_weight": self.sep_weight, "temperature": self.temperature, "drw_epoch": self.drw_epoch,
                         "drw_lr_factor": self.drw_lr_factor, "drw_reduction": self.drw_reduction,
                         "drw_active": self.drw_active}}

    def load_extra_state(self, state: dict) -> None:
        # the optimiser's and the scheduler's states already carry the lowered learning rate
        srat = state.get("srat", {})
        self.set_drw(bool(srat.get("drw_active", False)), lower_lr=False)


__all__ = ["DRW_BETA", "SRAT_LOSSES", "SRATTrainer", "srat_settings"]

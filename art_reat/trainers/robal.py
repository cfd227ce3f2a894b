"""RoBal (Wu et al., CVPR 2021; SPEC section 7), the main baseline, as a `PGDATTrainer`.

The model's head is a :class:`~art_reat.models.CosineClassifier`. Per batch:

1. Training attack (model in eval mode): PGD-5 with a one-sided random start ``x + eps * U[0, 1)``,
   maximising ``CE(z, y)`` on the SCALE-1 cosine logits ``z = head.cosine(features)``
   (:class:`CosineLogitPGD`), so the eval-mode inference adjustment of the head never reaches the
   training attack.
2. Outer loss (model in train mode), TRADES form:
   ``robal_margin_loss(z_nat, y) + trades_kl(z_nat, z_adv, beta)``, i.e. the class-aware margin
   loss on the NATURAL cosine logits plus ``beta / B * sum_i KL(softmax(z_nat_i) || softmax(z_adv_i))``
   on the scale-1 cosine logits of the natural and the adversarial batch (two train-mode forward
   passes, natural first, as in the TRADES code; gradients flow through both). ``margin_on="adversarial"``
   puts the margin loss on z_adv instead (the SPEC does not say which; see the project notes).
3. Inference: at construction the head gets ``s * cos - tau_p * log(prior)`` (prior = N_c / sum N)
   for eval mode, so validation, the final test and every attack (ART's predict/loss_gradient
   included) use RoBal's inference logits. The adjustment lives in the head's buffers and hence in
   every checkpoint.

Learning-rate schedules (:func:`robal_lr_scheduler`): "intended" is the configuration's
MultiStepLR; "released" reproduces the released RoBal code, which multiplies the learning rate by
the decay every epoch from the first milestone (60) on, so that training effectively stops two
epochs later.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from art_reat.attacks import TensorPGD
from art_reat.errors import UsageError
from art_reat.losses.robal import RoBalMarginLoss, trades_kl
from art_reat.models.cosine import CosineClassifier, attach_cosine_head
from art_reat.trainers.pgd_at import PGDATTrainer

#: SPEC section 7 defaults. CIFAR-100-LT's s and tau_m are not given by the SPEC: CIFAR-10-LT's.
ROBAL_DEFAULTS: Dict[str, Dict[str, float]] = {
    "cifar10": dict(m=0.1, s=10.0, tau_b=1.2, tau_m=0.0, beta=6.0, tau_p=0.1, gamma=0.03125),
    "cifar100": dict(m=0.2, s=10.0, tau_b=0.0, tau_m=0.0, beta=3.0, tau_p=1.5, gamma=0.03125),
}
MARGIN_INPUTS = ("natural", "adversarial")
LR_SCHEDULES = ("intended", "released")


def robal_settings(config, num_classes: int) -> Dict[str, float]:
    """RoBal hyper-parameters (m, s, tau_b, tau_m, beta, tau_p, gamma): the config's ``robal_*`` fields,
    or, where they are None (or absent), the SPEC's values for the dataset: CIFAR-100-LT's for 100
    classes, CIFAR-10-LT's otherwise."""
    defaults = ROBAL_DEFAULTS["cifar100" if int(num_classes) == 100 else "cifar10"]
    out = {}
    for name, default in defaults.items():
        value = getattr(config, f"robal_{name}", None)
        out[name] = float(default if value is None else value)
    return out


class CompoundingDecay:
    """LambdaLR factor ``gamma ** max(0, epoch - start + 1)``: x gamma every epoch from ``start`` on.

    A plain object (not a lambda) so that LambdaLR's state_dict carries ``start`` and ``gamma``.
    """

    def __init__(self, start: int, gamma: float) -> None:
        self.start = int(start)
        self.gamma = float(gamma)

    def __call__(self, epoch: int) -> float:
        return self.gamma ** max(0, int(epoch) - self.start + 1)


def robal_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str = "intended",
                       milestones: Sequence[int] = (60, 75), gamma: float = 0.1):
    """The epoch scheduler of RoBal training, attached to ``optimizer`` (stepped once per epoch).

    "intended": ``MultiStepLR(milestones, gamma)``. "released": the learning rate of epoch e
    (0-based) is ``lr * gamma ** max(0, e - milestones[0] + 1)``: equal to the intended schedule up
    to and including the first decayed epoch, then compounding (0.1, ..., 0.01, 0.001, 1e-4, ...).
    """
    if schedule not in LR_SCHEDULES:
        raise UsageError(f"invalid RoBal LR schedule {schedule!r}: must be {' or '.join(LR_SCHEDULES)}")
    milestones = sorted(int(m) for m in milestones)
    if schedule == "intended":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    if not milestones:
        raise UsageError("the released RoBal LR schedule needs a first milestone (the epoch the decay starts)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CompoundingDecay(milestones[0], gamma))


def cosine_head(model: torch.nn.Module) -> CosineClassifier:
    head = getattr(model, "head", None)
    if not isinstance(head, CosineClassifier) or not hasattr(model, "forward_features"):
        raise UsageError(f"RoBal needs a FeatureModel whose head is a CosineClassifier, got "
                         f"{type(model).__name__} with head {type(head).__name__}")
    return head


def cosine_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Scale-1 cosine logits of ``model`` on ``x`` in the model's current mode."""
    features, _ = model.forward_features(x)
    return cosine_head(model).cosine(features)


class CosineLogitPGD(TensorPGD):
    """PGD whose logits are the scale-1 cosine logits of the model's `CosineClassifier` head.

    RoBal's training attack: CE on ``head.cosine(features)``, never on the head's eval-mode
    (inference-adjusted) output. Default random start: one-sided, ``x + eps * U[0, 1)``.
    """

    def __init__(self, estimator, random_start: str = "one-sided", **kwargs) -> None:
        super().__init__(estimator, random_start=random_start, **kwargs)
        cosine_head(estimator.model)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.estimator.model, x)


class RoBalTrainer(PGDATTrainer):
    """RoBal adversarial training (see the module docstring).

    :param classifier: ART classifier whose model is a FeatureModel with a `CosineClassifier` head.
    :param train_counts: N_c, for the margins, the training prior and the inference prior.
    :param m, s, tau_b, tau_m: the margin loss (:func:`~art_reat.losses.robal_margin_loss`).
    :param beta: weight of the TRADES KL term.
    :param tau_p: inference prior shift; the head returns ``s * cos - tau_p * log(prior)`` in eval mode.
    :param margin_on: "natural" (TRADES form, default) or "adversarial": logits of the margin loss.
    :param random_start: of the training attack ("one-sided" in RoBal).
    Other keyword arguments go to `PGDATTrainer` (``max_iter`` defaults to 5 here).
    Defaults are CIFAR-10-LT's.
    """

    def __init__(self, classifier, *, train_counts, m: float = 0.1, s: float = 10.0, tau_b: float = 1.2,
                 tau_m: float = 0.0, beta: float = 6.0, tau_p: float = 0.1, margin_on: str = "natural",
                 random_start: str = "one-sided", max_iter: int = 5, **kwargs) -> None:
        head = cosine_head(classifier.model)
        if margin_on not in MARGIN_INPUTS:
            raise UsageError(f"invalid RoBal margin input {margin_on!r}: must be {' or '.join(MARGIN_INPUTS)}")
        if not (np.isfinite(float(beta)) and float(beta) >= 0):
            raise UsageError(f"invalid RoBal beta {beta!r}: must be a number >= 0")
        counts = np.asarray(train_counts.cpu() if isinstance(train_counts, torch.Tensor) else train_counts,
                            dtype=np.float64)
        if counts.shape != (classifier.nb_classes,):
            raise UsageError(f"train_counts has shape {counts.shape}: expected one count for each of the "
                             f"{classifier.nb_classes} classes")
        self.train_counts = counts
        self.random_start = random_start
        self.m, self.s, self.tau_b, self.tau_m = float(m), float(s), float(tau_b), float(tau_m)
        self.beta, self.tau_p, self.margin_on = float(beta), float(tau_p), margin_on
        self.margin_loss = RoBalMarginLoss(counts, m=m, s=s, tau_b=tau_b, tau_m=tau_m).to(classifier.device)
        super().__init__(classifier, max_iter=max_iter, **kwargs)
        head.set_inference_adjustment(self.s, self.tau_p, counts)
        self._natural: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------------------- hooks
    def build_attack(self, eps: float, eps_step: float, max_iter: int) -> CosineLogitPGD:
        return CosineLogitPGD(self._classifier, eps=eps, eps_step=eps_step, max_iter=max_iter,
                              random_start=self.random_start, batch_size=self.batch_size)

    def craft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._natural = x  # the TRADES term needs the natural batch in `training_loss`
        return self.attack.perturb(x, y, generator=self.batch_generator)

    def training_loss(self, x_adv: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        x_nat, self._natural = self._natural, None
        if x_nat is None or x_nat.shape != x_adv.shape:
            raise RuntimeError("RoBalTrainer.training_loss needs the natural batch: call craft(x, y) first")
        model = self._classifier.model
        z_nat = cosine_logits(model, x_nat)
        z_adv = cosine_logits(model, x_adv)
        margin = self.margin_loss(z_nat if self.margin_on == "natural" else z_adv, y)
        kl = trades_kl(z_nat, z_adv, self.beta)
        return margin + kl, z_adv, {"margin": margin.detach(), "trades": kl.detach()}

    def extra_state(self) -> dict:
        return {"robal": {"m": self.m, "s": self.s, "tau_b": self.tau_b, "tau_m": self.tau_m, "beta": self.beta,
                          "tau_p": self.tau_p, "margin_on": self.margin_on}}


def _optimizes(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    """True when the optimiser holds exactly the model's parameters."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return held == {id(p) for p in model.parameters()}


def prepare_robal_model(config, model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """`MODEL_PREPARERS` hook: give the model RoBal's cosine head (before the optimiser is built, or
    before a RoBal checkpoint is loaded; the checkpoint's buffers then restore s, tau_p and prior)."""
    if isinstance(getattr(model, "head", None), CosineClassifier):
        return model
    return attach_cosine_head(model, num_classes, robal_settings(config, num_classes)["gamma"])


def robal_parts(config, parts, common: dict):
    """Make `parts` (and the scheduler in `common`) fit for RoBal; returns ``(parts, common)``.

    If the model's head is not yet a `CosineClassifier`, it is replaced, and the optimiser (which
    was built on the old parameters) is rebuilt as SGD with the config's lr, momentum and weight
    decay. The scheduler is rebuilt on the optimiser the trainer will use whenever the given one is
    attached to another optimiser or the "released" schedule is asked for; with no scheduler given
    and the intended schedule, none is used. The classifier's loss (used only by ART's
    `loss_gradient`, e.g. by evaluation attacks) is plain CE on the inference logits: RoBal trains
    with its own margin loss and ignores ``config.loss``.
    """
    from art_reat.losses import build_loss

    common = dict(common)
    model = parts.model
    optimizer = parts.optimizer
    if not isinstance(getattr(model, "head", None), CosineClassifier) or not _optimizes(optimizer, model):
        prepare_robal_model(config, model, parts.num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    schedule = getattr(config, "robal_lr_schedule", "intended")
    scheduler = common.get("scheduler")
    if schedule == "released" or (scheduler is not None and getattr(scheduler, "optimizer", None) is not optimizer):
        scheduler = robal_lr_scheduler(optimizer, schedule, config.milestones, config.lr_gamma)
    common["scheduler"] = scheduler
    parts = replace(parts, optimizer=optimizer, loss=build_loss("ce", parts.train_counts))
    return parts, common


__all__ = ["CompoundingDecay", "CosineLogitPGD", "LR_SCHEDULES", "MARGIN_INPUTS", "ROBAL_DEFAULTS", "RoBalTrainer",
           "cosine_logits", "prepare_robal_model", "robal_lr_scheduler", "robal_parts", "robal_settings"]

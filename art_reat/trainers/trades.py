"""TRADES (Zhang et al., ICML 2019) with a long-tail natural loss, as a `PGDATTrainer`.

Per batch:

1. Training attack (model in eval mode): :class:`TradesKLPGD`, PGD that maximises
   ``sum_i KL(p(x_i) || p(x'_i))`` (p = softmax of the model's logits, the natural distribution
   computed once, before the steps), started at ``x + 0.001 * N(0, I)`` as in the TRADES code,
   ``x'`` clipped to [0, 1] after each step.
2. Outer loss (model in train mode, natural batch first, then adversarial, as in the TRADES code):
   ``L_lt(z_nat, y) + beta / B * sum_i KL(softmax(z_nat_i) || softmax(z_adv_i))``, where ``L_lt``
   is the classifier's long-tail loss (``--loss``: ce gives TRADES itself; bsl, ldam, focal, cb give
   the long-tail variants) and the KL term is on the raw logits (``trades_kl``; gradients through
   both sides). ``beta`` = ``--trades-beta`` (6 by default, TRADES's CIFAR-10 value).

Written here rather than with ART's `AdversarialTrainerTRADES` because that trainer steps ART's
own LR handling per batch and rejects the torch schedulers the project uses.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from art_reat.attacks import TensorPGD
from art_reat.errors import UsageError
from art_reat.losses import trades_kl
from art_reat.trainers.pgd_at import PGDATTrainer

#: standard deviation of the "normal" random start of the TRADES and MART code
NORMAL_START_STD = 1e-3


class NormalStartPGD(TensorPGD):
    """`TensorPGD` whose random start may also be ``"normal"``: ``x + 0.001 * N(0, I)``, not clipped
    before the first step (the TRADES and MART training attacks). Default: "normal"."""

    random_starts = TensorPGD.random_starts + ("normal",)

    def __init__(self, estimator, random_start: str = "normal", **kwargs) -> None:
        super().__init__(estimator, random_start=random_start, **kwargs)

    def _random_delta(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.random_start == "normal":
            return NORMAL_START_STD * self.batch_random(torch.randn, x.shape, generator, x.device, x.dtype)
        return super()._random_delta(x, generator)


class TradesKLPGD(NormalStartPGD):
    """TRADES's training attack: PGD on ``sum_i KL(p(x_i) || softmax(z(x'_i)))``, labels unused.

    Each ``perturb(x, y)`` first computes the natural distribution p(x) (in the attack's model mode,
    parameters frozen, without gradient) and then runs the usual loop; the loss is summed over the batch, so each sample's
    gradient is its own.
    """

    def __init__(self, estimator, **kwargs) -> None:
        super().__init__(estimator, **kwargs)
        self._target_log: Optional[torch.Tensor] = None

    def _pgd_loop(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        # called by `perturb` with the model already in the attack's mode
        with torch.no_grad():
            self._target_log = F.log_softmax(self.logits(x), dim=1)
        try:
            return super()._pgd_loop(x, y, generator)
        finally:
            self._target_log = None

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = self._target_log
        if target is not None:
            target = target[self.rows]  # the chunk of the batch whose gradient is being taken
        if target is None or target.shape != logits.shape:
            raise UsageError("the TRADES attack needs the natural batch: call perturb(x, y) (masks are not supported)")
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum", log_target=True)

    def generate(self, x: np.ndarray, y: Optional[np.ndarray] = None, **kwargs) -> np.ndarray:
        if kwargs.get("mask") is not None:
            raise UsageError("the TRADES attack does not support masks")
        return super().generate(x, y, **kwargs)


def check_beta(name: str, beta: float) -> float:
    if not (isinstance(beta, (int, float)) and math.isfinite(float(beta)) and float(beta) >= 0):
        raise UsageError(f"invalid {name} {beta!r}: must be a number >= 0")
    return float(beta)


class NaturalBatchTrainer(PGDATTrainer):
    """Base of the trainers whose outer loss needs the natural batch too (TRADES, MART): a weight
    ``beta`` of the robust term, a normal-start training attack of class `attack_class`, and `craft`
    keeping the natural batch for `natural_and_adversarial_logits`.

    :param beta: weight of the robust term (the option named `beta_option`).
    :param random_start: of the training attack ("normal": 0.001 * N(0, I), the TRADES / MART code).
    Other keyword arguments go to `PGDATTrainer`.
    """

    attack_class = NormalStartPGD
    beta_option = "beta"  # the option's name in error messages
    state_key = "natural-batch"  # the key of `extra_state` in checkpoints
    _natural: Optional[torch.Tensor] = None

    def __init__(self, classifier, *, beta: float = 6.0, random_start: str = "normal", **kwargs) -> None:
        self.beta = check_beta(self.beta_option, beta)
        self.random_start = random_start
        super().__init__(classifier, **kwargs)

    def build_attack(self, eps: float, eps_step: float, max_iter: int) -> NormalStartPGD:
        return self.attack_class(self._classifier, eps=eps, eps_step=eps_step, max_iter=max_iter,
                                 random_start=self.random_start, batch_size=self.batch_size)

    def craft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._natural = x
        return super().craft(x, y)

    def natural_and_adversarial_logits(self, x_adv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The model's logits on the natural batch kept by `craft`, then on ``x_adv`` (train mode, in
        the order of the TRADES / MART code)."""
        x_nat, self._natural = self._natural, None
        if x_nat is None or x_nat.shape != x_adv.shape:
            raise RuntimeError(f"{type(self).__name__}.training_loss needs the natural batch: call craft(x, y) first")
        model = self._classifier.model
        z_nat = model(x_nat)
        return z_nat, model(x_adv)

    def extra_state(self) -> dict:
        return {self.state_key: {"beta": self.beta, "random_start": self.random_start}}


class TRADESTrainer(NaturalBatchTrainer):
    """TRADES with the classifier's long-tail loss as the natural loss (see the module docstring);
    ``beta`` = ``--trades-beta``."""

    attack_class = TradesKLPGD
    beta_option, state_key = "trades-beta", "trades"

    def training_loss(self, x_adv: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        z_nat, z_adv = self.natural_and_adversarial_logits(x_adv)
        natural = self._classifier._loss(z_nat, y)
        kl = trades_kl(z_nat, z_adv, self.beta)
        return natural + kl, z_adv, {"lt": natural.detach(), "trades": kl.detach()}


__all__ = ["NORMAL_START_STD", "NaturalBatchTrainer", "NormalStartPGD", "TRADESTrainer", "TradesKLPGD", "check_beta"]

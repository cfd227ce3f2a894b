"""Standard AutoAttack (Croce & Hein: APGD-CE, APGD-T, FAB-T, Square) from PyPI `pyautoattack`.

ART ships an `AutoAttack` too, but it is a differently configured ensemble (no FAB, no targeted
APGD); numbers from it must not be reported as "AutoAttack". This class wraps the original code
with `version="standard"` as an ART evasion attack.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from art.attacks.attack import EvasionAttack
from art.estimators.classification.classifier import ClassifierMixin
from art.estimators.estimator import BaseEstimator

from art_reat.errors import UsageError

_NORMS = {"linf": "Linf", "inf": "Linf", "l2": "L2", "2": "L2"}


class StandardAutoAttack(EvasionAttack):
    """AutoAttack, standard version, on the estimator's model in eval mode.

    :param norm: "linf" or "l2".
    :param eps: radius of the threat model (inputs in [0, 1]).
    :param state_path: optional file for pyautoattack's own resume state (attacks finished so far);
        the evaluation suite adds resume per batch on top.
    """

    attack_params = EvasionAttack.attack_params + ["norm", "eps", "batch_size", "seed", "verbose"]
    _estimator_requirements = (BaseEstimator, ClassifierMixin)

    def __init__(self, estimator, norm: str = "linf", eps: float = 8 / 255, batch_size: int = 500,
                 seed: int = 0, verbose: bool = False) -> None:
        super().__init__(estimator=estimator)
        self.norm = str(norm).lower()
        self.eps = eps
        self.batch_size = batch_size
        self.seed = seed
        self.verbose = verbose
        self._check_params()

    def _check_params(self) -> None:
        if self.norm not in _NORMS:
            raise UsageError(f"invalid norm {self.norm!r} for AutoAttack: must be linf or l2")
        if not 0 < float(self.eps) <= 1 and _NORMS[self.norm] == "Linf":
            raise UsageError(f"invalid eps {self.eps!r}: must be in (0, 1] for L-inf")
        if not float(self.eps) > 0:
            raise UsageError(f"invalid eps {self.eps!r}: must be > 0")
        if int(self.batch_size) < 1:
            raise UsageError(f"invalid batch size {self.batch_size!r}: must be >= 1")

    def perturb(self, x: torch.Tensor, y: torch.Tensor, state_path: Optional[Path] = None,
                generator=None) -> torch.Tensor:
        from pyautoattack import AutoAttack

        model = self.estimator.model
        was_training = model.training
        model.eval()
        # pyautoattack `view`s input gradients: a permuted (channels-last) batch from uint8 NHWC data breaks it
        x = x.contiguous()
        try:
            adversary = AutoAttack(model, norm=_NORMS[self.norm], eps=float(self.eps), version="standard",
                                   device=x.device, seed=self.seed)
            adversary.verbose = self.verbose
            if not self.verbose:
                adversary.logger.setLevel(logging.WARNING)
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=int(self.batch_size),
                                                         state_path=state_path)
            return x_adv.detach()
        finally:
            model.train(was_training)

    def generate(self, x: np.ndarray, y: Optional[np.ndarray] = None, **kwargs) -> np.ndarray:
        device = self.estimator.device
        if y is None:
            labels = np.argmax(self.estimator.predict(x, batch_size=self.batch_size), axis=1)
        else:
            labels = np.argmax(y, axis=1) if np.ndim(y) == 2 else np.asarray(y)
        xt = torch.as_tensor(x, dtype=torch.float32, device=device)
        yt = torch.as_tensor(labels, dtype=torch.long, device=device)
        return self.perturb(xt, yt).cpu().numpy()

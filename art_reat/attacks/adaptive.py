"""Evaluation attacks of SPEC section 9 that change PGD's loss: CW margin and logit scaling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from art_reat.attacks.pgd import TensorPGD
from art_reat.errors import UsageError


class LogitScaledPGD(TensorPGD):
    """PGD on `CE(alpha * logits, y)`, the adaptive attack against scale-invariant (cosine) classifiers.

    A classifier whose logits are bounded (cosine) saturates no softmax, but its CE gradient can be
    tiny and badly conditioned; scaling the logits by alpha (default 10) restores a useful gradient.
    Only the attack's loss is scaled: predictions use the unscaled logits.
    """

    attack_params = TensorPGD.attack_params + ["alpha"]

    def __init__(self, estimator, alpha: float = 10.0, **kwargs) -> None:
        self.alpha = alpha
        super().__init__(estimator, **kwargs)

    def _check_own_params(self) -> None:
        if not float(self.alpha) > 0:
            raise UsageError(f"invalid logit scale {self.alpha!r}: must be a number > 0")
        super()._check_own_params()

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(float(self.alpha) * logits, y, reduction="sum")


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Per-sample `-clamp(z_y - max_{j != y} z_j + kappa, min=0)`: larger when the margin is smaller."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -(true - others + kappa).clamp(min=0)


class CWMarginPGD(TensorPGD):
    """PGD on the Carlini-Wagner margin loss with confidence `kappa` (default 50, the common code's)."""

    attack_params = TensorPGD.attack_params + ["kappa"]

    def __init__(self, estimator, kappa: float = 50.0, **kwargs) -> None:
        self.kappa = kappa
        super().__init__(estimator, **kwargs)

    def _check_own_params(self) -> None:
        if not float(self.kappa) >= 0:
            raise UsageError(f"invalid CW confidence kappa {self.kappa!r}: must be a number >= 0")
        super()._check_own_params()

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cw_margin_loss(logits, y, float(self.kappa)).sum()

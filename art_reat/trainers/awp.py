"""PGD-AT with adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020), as a `PGDATTrainer`.

Per batch, after the usual PGD attack (model in eval mode, CE, uniform random start):

1. A proxy copy of the model (made once, at construction) receives the model's weights and
   buffers and takes one SGD step of size ``proxy_lr`` that ASCENDS the training loss on the
   adversarial batch (train mode): ``proxy <- w + proxy_lr * grad L(w)``.
2. For every weight of dimension > 1 whose name contains "weight" (convolutions and linear
   layers; BatchNorm and biases are left alone, as in the released AWP code) the perturbation is
   ``v_l = ||w_l|| / (||d_l|| + 1e-20) * d_l``, ``d_l = proxy_l - w_l``, and the model's weights
   become ``w_l + gamma * v_l``: a per-layer perturbation of norm ``gamma * ||w_l||``
   (``--awp-gamma``, 5e-3 by default). The proxy's learning rate cancels in the normalisation.
3. The training loss is computed, back-propagated and the optimiser steps AT the perturbed weights;
   then ``gamma * v`` is subtracted again (the "restore" of the AWP code), so the update found at
   ``w + gamma v`` is applied to ``w``.

``--awp-warmup E``: no perturbation during the first E epochs (0 by default, the AT-AWP setting).
The loss that the proxy ascends and the model descends is the classifier's long-tail loss
(``--loss``; ``ce`` is AT-AWP itself). The restore also runs at the start of the next batch and at
the end of the epoch, so the saved weights are never the perturbed ones.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import torch

from art_reat.errors import UsageError
from art_reat.trainers.pgd_at import PGDATTrainer

#: added to the norm of the proxy's weight change, as in the AWP code
AWP_EPS = 1e-20


def perturbed_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """The parameters AWP perturbs: dimension > 1 and "weight" in the name."""
    return {name: p for name, p in model.named_parameters() if p.dim() > 1 and "weight" in name}


class AWPTrainer(PGDATTrainer):
    """PGD-AT + adversarial weight perturbation (see the module docstring).

    :param gamma: relative size of the per-layer weight perturbation (``--awp-gamma``).
    :param warmup: epochs without weight perturbation at the start (``--awp-warmup``).
    :param proxy_lr: step of the proxy's ascent (cancels in the normalisation; 0.01).
    Other keyword arguments go to `PGDATTrainer`.
    """

    def __init__(self, classifier, *, gamma: float = 5e-3, warmup: int = 0, proxy_lr: float = 0.01,
                 **kwargs) -> None:
        if not (isinstance(gamma, (int, float)) and math.isfinite(float(gamma)) and float(gamma) >= 0):
            raise UsageError(f"invalid awp-gamma {gamma!r}: must be a number >= 0")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise UsageError(f"invalid awp-warmup {warmup!r}: must be an integer >= 0")
        if not (math.isfinite(float(proxy_lr)) and float(proxy_lr) > 0):
            raise UsageError(f"invalid AWP proxy learning rate {proxy_lr!r}: must be a number > 0")
        super().__init__(classifier, **kwargs)
        self.gamma, self.warmup, self.proxy_lr = float(gamma), int(warmup), float(proxy_lr)
        self.proxy = copy.deepcopy(classifier.model)
        self.proxy_optimizer = torch.optim.SGD(self.proxy.parameters(), lr=self.proxy_lr)
        self.epoch = self.start_epoch
        self._pending: Optional[Dict[str, torch.Tensor]] = None

    # ----------------------------------------------------------------------------- AWP proper
    def active(self, epoch: Optional[int] = None) -> bool:
        return self.gamma > 0 and (self.epoch if epoch is None else epoch) >= self.warmup

    def weight_perturbation(self, x_adv: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The direction v (per layer, ``||v_l|| = ||w_l||``) from one ascent step of the proxy."""
        model, proxy = self._classifier.model, self.proxy
        proxy.load_state_dict(model.state_dict())
        proxy.train()
        loss = -self._classifier._loss(proxy(x_adv), y)
        self.proxy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.proxy_optimizer.step()
        proxy_params = perturbed_parameters(proxy)
        diff = {}
        with torch.no_grad():
            for name, w in perturbed_parameters(model).items():
                d = proxy_params[name] - w
                diff[name] = w.norm() / (d.norm() + AWP_EPS) * d
        return diff

    def add_into_weights(self, diff: Dict[str, torch.Tensor], coeff: float) -> None:
        params = perturbed_parameters(self._classifier.model)
        with torch.no_grad():
            for name, v in diff.items():
                params[name].add_(v, alpha=coeff)

    def perturb_weights(self, x_adv: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute v and move the model's weights to ``w + gamma * v`` (undone by `restore_weights`)."""
        self.restore_weights()
        diff = self.weight_perturbation(x_adv, y)
        self.add_into_weights(diff, self.gamma)
        self._pending = diff
        return diff

    def restore_weights(self) -> None:
        if self._pending is not None:
            diff, self._pending = self._pending, None
            self.add_into_weights(diff, -self.gamma)

    # ----------------------------------------------------------------------------- hooks
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def training_loss(self, x_adv: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        if self.active():
            self.perturb_weights(x_adv, y)
        else:
            self.restore_weights()
        return super().training_loss(x_adv, y)

    def on_batch_end(self, x_adv: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        self.restore_weights()

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        self.restore_weights()
        return {"awp/active": float(self.active(epoch))}

    def extra_state(self) -> dict:
        return {"awp": {"gamma": self.gamma, "warmup": self.warmup, "proxy_lr": self.proxy_lr},
                "awp_proxy_optimizer": self.proxy_optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self._pending = None  # the loaded weights replaced any perturbed ones
        if "awp_proxy_optimizer" in state:
            self.proxy_optimizer.load_state_dict(state["awp_proxy_optimizer"])
        self.epoch = self.start_epoch


__all__ = ["AWP_EPS", "AWPTrainer", "perturbed_parameters"]

"""REAT (SPEC section 6): PGD-AT whose attack is `RebalancedPGD` and whose loss may add TAIL.

Per batch: the attack crafts the adversarial batch (model in eval mode); the model is trained on
it in train mode; the argmax of THOSE train-mode logits (before the optimiser step) is counted
per class, as in the released code. At the end of the epoch the counts become the attack's new
class weights; before the first epoch the counts are the training counts N_c.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from art_reat.attacks import RebalancedPGD
from art_reat.distributed import all_reduce_sum_
from art_reat.trainers.pgd_at import PGDATTrainer


class REATTrainer(PGDATTrainer):
    """PGD-AT with re-balanced adversarial examples (RBL); TAIL lives in the classifier's loss."""

    def __init__(self, classifier, *, train_counts, rebalance: str = "reference", **kwargs) -> None:
        self.train_counts = train_counts
        self.rebalance = rebalance
        super().__init__(classifier, **kwargs)
        self.adv_pred_counts = torch.zeros(classifier.nb_classes, dtype=torch.long, device=classifier.device)
        self.adv_pred_history: List[Dict[str, list]] = []

    def build_attack(self, eps: float, eps_step: float, max_iter: int) -> RebalancedPGD:
        return RebalancedPGD(self._classifier, train_counts=self.train_counts, rebalance=self.rebalance,
                             eps=eps, eps_step=eps_step, max_iter=max_iter, batch_size=self.batch_size)

    def on_epoch_start(self, epoch: int) -> None:
        self.adv_pred_counts.zero_()

    def on_batch_end(self, x_adv: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        pred = logits.argmax(dim=1)
        # scatter_add, not bincount: bincount reads min/max back to the host (a sync per batch on CUDA)
        self.adv_pred_counts.scatter_add_(0, pred, torch.ones_like(pred))

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        all_reduce_sum_(self.adv_pred_counts, self.dist)  # several processes: the counts of the global batches
        counts = self.adv_pred_counts.cpu()
        weights_used = self.attack.class_weights.cpu()
        self.attack.update_counts(counts)
        self.adv_pred_history.append({"epoch": epoch, "adv_pred_counts": counts.tolist(),
                                      "attack_class_weights": weights_used.tolist()})
        metrics = {f"adv_pred/class_{c}": float(n) for c, n in enumerate(counts.tolist())}
        metrics.update({f"rbl_weight/class_{c}": float(w) for c, w in enumerate(weights_used.tolist())})
        return metrics

    def epoch_artifacts(self) -> Dict[str, object]:
        return {"adv_pred_hist.json": self.adv_pred_history}

    def extra_state(self) -> dict:
        # the running counts matter for a mid-epoch (interrupt) checkpoint, where the epoch goes on
        return {"class_weights": self.attack.class_weights.cpu(), "adv_pred_history": self.adv_pred_history,
                "adv_pred_counts": self.adv_pred_counts.cpu()}

    def all_reduce_running_state(self) -> None:
        all_reduce_sum_(self.adv_pred_counts, self.dist)

    def drop_running_state(self) -> None:
        self.adv_pred_counts.zero_()

    def load_extra_state(self, state: dict) -> None:
        if "class_weights" in state:
            self.attack.set_class_weights(state["class_weights"])
        self.adv_pred_history = list(state.get("adv_pred_history", []))
        if "adv_pred_counts" in state:
            self.adv_pred_counts.copy_(state["adv_pred_counts"].to(self.adv_pred_counts.device))

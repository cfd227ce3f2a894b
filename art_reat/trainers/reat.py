"""REAT (SPEC section 6): PGD-AT whose attack is `RebalancedPGD` and whose loss may add TAIL.

Per batch: the attack crafts the adversarial batch (model in eval mode); the model is trained on
it in train mode; the argmax of THOSE train-mode logits (before the optimiser step) is counted
per class, as in the released code (`PGDATTrainer.adv_pred_counts`, which every trainer keeps). At
the end of the epoch the counts become the attack's new class weights; before the first epoch the
counts are the training counts N_c.
"""

from __future__ import annotations

from typing import Dict, List

from art_reat.attacks import RebalancedPGD
from art_reat.trainers.pgd_at import PGDATTrainer


class REATTrainer(PGDATTrainer):
    """PGD-AT with re-balanced adversarial examples (RBL); TAIL lives in the classifier's loss."""

    def __init__(self, classifier, *, train_counts, rebalance: str = "reference", **kwargs) -> None:
        self.train_counts = train_counts
        self.rebalance = rebalance
        super().__init__(classifier, **kwargs)
        self.adv_pred_history: List[Dict[str, list]] = []

    def build_attack(self, eps: float, eps_step: float, max_iter: int) -> RebalancedPGD:
        return RebalancedPGD(self._classifier, train_counts=self.train_counts, rebalance=self.rebalance,
                             eps=eps, eps_step=eps_step, max_iter=max_iter, batch_size=self.batch_size)

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        counts = self.adv_pred_counts.cpu()  # the epoch's counts (over all ranks), kept by the base trainer
        weights_used = self.attack.class_weights.cpu()
        self.attack.update_counts(counts)
        self.adv_pred_history.append({"epoch": epoch, "adv_pred_counts": counts.tolist(),
                                      "attack_class_weights": weights_used.tolist()})
        return {f"rbl_weight/class_{c}": float(w) for c, w in enumerate(weights_used.tolist())}

    def epoch_artifacts(self) -> Dict[str, object]:
        return {"adv_pred_hist.json": self.adv_pred_history}

    def extra_state(self) -> dict:
        # adv_pred_counts: the counts so far, for the record (a mid-epoch resume takes them from the
        # checkpoint's `partial` running sums, as every trainer does)
        return {"class_weights": self.attack.class_weights.cpu(), "adv_pred_history": self.adv_pred_history,
                "adv_pred_counts": self.adv_pred_counts.cpu()}

    def load_extra_state(self, state: dict) -> None:
        if "class_weights" in state:
            self.attack.set_class_weights(state["class_weights"])
        self.adv_pred_history = list(state.get("adv_pred_history", []))

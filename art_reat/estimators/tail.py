"""TAIL as the training loss of an ART classifier: `L_lt(logits) + lambda * TAIL(features)`."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from art_reat.errors import UsageError
from art_reat.estimators.classifier import LongTailClassifier
from art_reat.losses import TAIL_MODES, tail_class_weights, tail_regularizer_core


class TAILPyTorchClassifier(LongTailClassifier):
    """Classifier whose training loss adds REAT's tail feature regulariser (SPEC section 5).

    The model must provide `forward_features(x) -> (features, logits)` (every model of the
    registry does). `tail_mode` is "reference" (the released code's value and gradient) or
    "paper" (Eq. 3); `tail_classes=None` uses the default class-group rule.
    """

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, nb_classes: int, *,
                 train_counts: Sequence[int], tail_mode: str = "reference", tail_weight: float = 1.0,
                 tail_classes: Optional[Sequence[int]] = None, **kwargs) -> None:
        if tail_mode not in TAIL_MODES:
            raise UsageError(f"invalid tail mode {tail_mode!r}: choose one of {', '.join(TAIL_MODES)}")
        if not hasattr(model, "forward_features"):
            raise UsageError(f"model {type(model).__name__} has no forward_features(x): TAIL needs the penultimate features")
        super().__init__(model, loss, nb_classes, **kwargs)
        self.train_counts = np.asarray(train_counts)
        self.tail_mode = tail_mode
        self.tail_weight = float(tail_weight)
        if tail_classes is None:
            from art_reat.data import class_groups

            tail_classes = class_groups(nb_classes, "reference")["tail"]
        self.tail_classes = list(tail_classes)
        # constants of the regulariser, on the device once: the per-batch call reads nothing back
        self._omega_c = tail_class_weights(self.train_counts).to(self.device)  # float64: cast per use
        self._tail_mask = torch.zeros(nb_classes, dtype=torch.bool, device=self.device)
        self._tail_mask[self.tail_classes] = True
        # several processes (set by the trainer): TAIL on the all-gathered global batch, as in one process
        self.dist = None
        self.batch_shard = None

    def _global_batch(self, features: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the whole global batch when this process holds a slice of it
        (the gather keeps the gradient of this rank's features); the inputs otherwise."""
        if self.dist is None or self.batch_shard is None:
            return features, y
        from art_reat.distributed import gather_batch

        return gather_batch(features, self.batch_shard, self.dist), gather_batch(y, self.batch_shard, self.dist)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        features, logits = self.model.forward_features(x)
        lt = self._loss(logits, y)
        features, labels = self._global_batch(features, y)
        tail = tail_regularizer_core(features, labels, self._omega_c, self._tail_mask, self.tail_mode, self.tail_weight)
        return lt + tail, logits, {"lt": lt.detach(), "tail": tail.detach()}

    def fit(self, x: np.ndarray, y: np.ndarray, batch_size: int = 128, nb_epochs: int = 10,
            training_mode: bool = True, **kwargs) -> None:
        """ART's `fit` (clean training) with the TAIL-augmented loss."""
        if self.optimizer is None:
            raise UsageError("an optimizer is required to fit the classifier")
        labels = np.argmax(y, axis=1) if np.ndim(y) == 2 else np.asarray(y)
        model = self.model
        model.train(training_mode)
        for _ in range(nb_epochs):
            order = np.random.permutation(len(x))
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                xb = torch.as_tensor(x[idx], dtype=torch.float32, device=self.device)
                yb = torch.as_tensor(labels[idx], dtype=torch.long, device=self.device)
                loss, _, _ = self.training_loss(xb, yb)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

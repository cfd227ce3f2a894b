"""ART `PyTorchClassifier` with a training loss that may need more than the logits."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from art.estimators.classification import PyTorchClassifier


class LongTailClassifier(PyTorchClassifier):
    """A `PyTorchClassifier` (clip values 0..1 by default) whose trainers call `training_loss`.

    `training_loss(x, y)` returns (loss, logits, terms): the scalar to minimise, the logits of the
    same forward pass (trainers count predictions from them) and the named loss terms for logging.
    Subclasses (e.g. TAIL) add terms that use the model's penultimate features.
    """

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, nb_classes: int,
                 input_shape: Tuple[int, ...] = (3, 32, 32), optimizer: Optional[torch.optim.Optimizer] = None,
                 device: torch.device | str = "cpu", clip_values=(0.0, 1.0)) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # ART's "gpu" means the current CUDA device
        super().__init__(model=model, loss=loss.to(device), input_shape=input_shape, nb_classes=nb_classes,
                         optimizer=optimizer, clip_values=clip_values,
                         device_type="cpu" if device.type == "cpu" else "gpu")

    @property
    def loss_fn(self) -> torch.nn.Module:
        return self._loss

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        logits = self.model(x)
        loss = self._loss(logits, y)
        return loss, logits, {"lt": loss.detach()}

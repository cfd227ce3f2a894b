"""PGD adversarial training (Madry et al.) as a subclass of ART's `AdversarialTrainerMadryPGD`.

It keeps ART's interface (`fit(x, y)` on numpy, `get_classifier()`), but the epoch loop is
tensor-native: the data stay on the device, the attack takes input-only gradients, and the LR
scheduler (any torch scheduler) is stepped once per epoch, not per batch as ART's trainer does.

Subclasses change one thing each through the hooks `craft`, `training_loss`, `on_batch_end`,
`on_epoch_end` and `extra_state` / `load_extra_state` (what a checkpoint must carry).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from art.defences.trainer import AdversarialTrainerMadryPGD
from art.defences.trainer.trainer import Trainer

from art_reat.attacks import TensorPGD
from art_reat.evaluation import accuracy_report, predict_loader

EpochCallback = Callable[[int, Dict[str, float]], None]


class PGDATTrainer(AdversarialTrainerMadryPGD):
    """PGD-AT with the classifier's loss as the outer loss (e.g. BSL) and CE-PGD as the inner attack.

    :param classifier: an ART `PyTorchClassifier` holding model, loss and optimiser (normally a
        `LongTailClassifier`, whose `training_loss` is used).
    :param attack: the training attack; default: `TensorPGD` with `eps`, `eps_step`, `max_iter`.
    :param scheduler: any `torch.optim.lr_scheduler` object, stepped once per epoch.
    :param eval_attack_steps: steps of the PGD used on the validation split each epoch.
    :param checkpoint_dir: where `last.pt` and `best.pt` (by validation robust accuracy) are written.
    :param callbacks: called as `callback(epoch, metrics)` after each epoch (e.g. MLflow logging).
    """

    def __init__(self, classifier, attack: Optional[TensorPGD] = None, *, nb_epochs: int = 80,
                 batch_size: int = 128, eps: float = 8 / 255, eps_step: float = 2 / 255, max_iter: int = 10,
                 scheduler=None, eval_attack_steps: int = 20, checkpoint_dir: Optional[str | Path] = None,
                 checkpoint_meta: Optional[dict] = None, callbacks: Sequence[EpochCallback] = (),
                 progress: bool = False) -> None:
        # ART's __init__ would build its own numpy PGD and AdversarialTrainer; we only need the base.
        Trainer.__init__(self, classifier)
        self.nb_epochs = nb_epochs
        self.batch_size = batch_size
        self.attack = attack if attack is not None else self.build_attack(eps, eps_step, max_iter)
        self.eval_attack = TensorPGD(classifier, norm=self.attack.norm, eps=float(self.attack.eps),
                                     eps_step=float(self.attack.eps_step), max_iter=eval_attack_steps,
                                     batch_size=batch_size)
        self.scheduler = scheduler
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.callbacks: List[EpochCallback] = list(callbacks)
        self.progress = progress
        self.history: List[Dict[str, float]] = []
        self.start_epoch = 0
        self.best_metric = -math.inf

    # ----------------------------------------------------------------------------- hooks
    def build_attack(self, eps: float, eps_step: float, max_iter: int) -> TensorPGD:
        return TensorPGD(self._classifier, eps=eps, eps_step=eps_step, max_iter=max_iter,
                         batch_size=self.batch_size)

    def craft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack.perturb(x, y)

    def training_loss(self, x_adv: torch.Tensor, y: torch.Tensor):
        """(loss, logits, terms) of the outer minimisation, model in train mode."""
        classifier = self._classifier
        if hasattr(classifier, "training_loss"):
            return classifier.training_loss(x_adv, y)
        logits = classifier.model(x_adv)
        loss = classifier._loss(logits, y)
        return loss, logits, {"lt": loss.detach()}

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_batch_end(self, x_adv: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        return {}

    def epoch_artifacts(self) -> Dict[str, object]:
        """JSON-serialisable artifacts (file name -> data) to log after each epoch."""
        return {}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ----------------------------------------------------------------------------- ART interface
    def get_classifier(self):
        return self._classifier

    def fit(self, x: np.ndarray, y: np.ndarray, validation_data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
            batch_size: Optional[int] = None, nb_epochs: Optional[int] = None, **kwargs) -> None:
        """ART-style entry point: x float NCHW in [0, 1] (or uint8 NHWC), y labels or one-hot."""
        from art_reat.data import DeviceLoader

        device = self._classifier.device
        batch_size = batch_size or self.batch_size
        train = DeviceLoader(x, _labels(y), batch_size, device, augment=kwargs.get("augment", False),
                             shuffle=True, seed=kwargs.get("seed", 0))
        val = None
        if validation_data is not None:
            val = DeviceLoader(validation_data[0], _labels(validation_data[1]), batch_size, device)
        self.fit_loader(train, val, nb_epochs=nb_epochs)

    # ----------------------------------------------------------------------------- the epoch loop
    def fit_loader(self, train_loader, val_loader=None, nb_epochs: Optional[int] = None) -> List[Dict[str, float]]:
        nb_epochs = nb_epochs or self.nb_epochs
        for epoch in range(self.start_epoch, nb_epochs):
            metrics = self.train_epoch(epoch, train_loader)
            if val_loader is not None:
                metrics.update(self.validate(val_loader))
            metrics.update(self.on_epoch_end(epoch))
            self.start_epoch = epoch + 1
            self.history.append(metrics)
            self._save_checkpoints(metrics)
            for callback in self.callbacks:
                callback(epoch, metrics)
        return self.history

    def train_epoch(self, epoch: int, loader) -> Dict[str, float]:
        model = self._classifier.model
        optimizer = self._classifier.optimizer
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self.on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        device = self._classifier.device
        # running sums stay on the device: no host sync per batch
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        term_sums: Dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        batches = _progress(loader, f"epoch {epoch + 1}/{self.nb_epochs}", self.progress)
        for x, y in batches:
            x_adv = self.craft(x, y)
            model.train()
            loss, logits, terms = self.training_loss(x_adv, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logits = logits.detach()
            self.on_batch_end(x_adv, y, logits)
            n = y.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach().double() * n
            correct += (logits.argmax(dim=1) == y).sum()
        if self.scheduler is not None:
            self.scheduler.step()
        metrics = {
            "train/loss": float(loss_sum) / max(seen, 1),
            "train/adv_acc": float(correct) / max(seen, 1),
            "lr": lr,
            "epoch_seconds": time.perf_counter() - start,
        }
        metrics.update({f"train/loss_{name}": float(v) / max(seen, 1) for name, v in term_sums.items()})
        return metrics

    def validate(self, loader) -> Dict[str, float]:
        model = self._classifier.model
        clean_pred, labels = predict_loader(model, loader)
        robust_pred, _ = predict_loader(model, loader, attack=self.eval_attack)
        steps = self.eval_attack.max_iter
        return {"val/clean_acc": accuracy_report(clean_pred, labels, self._classifier.nb_classes)["overall"],
                f"val/pgd{steps}_acc": accuracy_report(robust_pred, labels, self._classifier.nb_classes)["overall"]}

    # ----------------------------------------------------------------------------- checkpoints
    @property
    def selection_metric(self) -> str:
        return f"val/pgd{self.eval_attack.max_iter}_acc"

    def state_dict(self) -> dict:
        return {
            "model": self._classifier.model.state_dict(),
            "optimizer": self._classifier.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.start_epoch,
            "best_metric": self.best_metric,
            "history": self.history,
            "trainer": self.extra_state(),
            "meta": self.checkpoint_meta,
        }

    def load_state_dict(self, state: dict) -> None:
        self._classifier.model.load_state_dict(state["model"])
        self._classifier.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.history = list(state.get("history", []))
        self.load_extra_state(state.get("trainer", {}))

    def _save_checkpoints(self, metrics: Dict[str, float]) -> None:
        # with no validation split, the last epoch is the best one
        score = metrics.get(self.selection_metric, float(self.start_epoch))
        improved = score > self.best_metric
        if improved:
            self.best_metric = score
        if self.checkpoint_dir is None:
            return
        state = self.state_dict()
        save_atomic(state, self.checkpoint_dir / "last.pt")
        if improved:
            save_atomic(state, self.checkpoint_dir / "best.pt")


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return np.argmax(y, axis=1) if y.ndim == 2 else y.astype(np.int64)


def _progress(iterable: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

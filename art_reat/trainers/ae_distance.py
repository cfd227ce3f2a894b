"""How far do the adversarial examples of the same image move from one epoch to the next? (Fig. 3)

`AEDistanceRecorder` is an epoch callback of a trainer (`trainer.callbacks`). It holds a fixed probe
set of training images (no augmentation). After every epoch it crafts their adversarial examples
with the trainer's own training attack (`trainer.attack`, so REAT's re-balanced attack with the
class weights of the next epoch, RoBal's cosine-logit PGD, ...), always from the same random start
(a generator re-seeded with a fixed seed), and adds the metric

    ae_distance = mean_i || x_adv_i(epoch e) - x_adv_i(epoch e - 1) ||_2

(pixels in [0, 1]) to the epoch's metrics, so that the logging callback that runs after it writes
it to MLflow. The "previous" examples of the first epoch are crafted with the initial model, when
the recorder is built. The recorder uses its own generator and frozen BatchNorm statistics (the
attack runs in eval mode), so training with and without it gives the same model.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from art_reat.data import proportional_subset

METRIC = "ae_distance"


def probe_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` fixed training images: a seeded sample keeping the class shares (at least one image per
    class) when `n` allows, otherwise `n` seeded random images. Sorted indices."""
    labels = np.asarray(labels)
    n = min(int(n), len(labels))
    present = len(np.unique(labels))
    if n >= present:
        return proportional_subset(labels, n, seed=seed)
    return np.sort(np.random.RandomState(seed).choice(len(labels), n, replace=False)).astype(np.int64)


def _as_batch(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.permute(0, 3, 1, 2).float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    return t.to(device)


class AEDistanceRecorder:
    """Epoch callback: `recorder(epoch, metrics)` adds `metrics["ae_distance"]`.

    :param trainer: a `PGDATTrainer` (or subclass); its `attack` crafts the examples.
    :param x: probe images, uint8 NHWC or float NCHW in [0, 1].
    :param y: their labels.
    :param seed: seed of the fixed random start.
    :param batch_size: attack batch size.
    """

    def __init__(self, trainer, x: np.ndarray, y: np.ndarray, seed: int = 0, batch_size: int = 256) -> None:
        self.trainer = trainer
        self.device = trainer.get_classifier().device
        self.x = _as_batch(x, self.device)
        self.y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=self.device)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.history: List[Dict[str, float]] = []
        self.previous: Optional[torch.Tensor] = self.craft()

    @classmethod
    def for_training(cls, trainer, x_train: np.ndarray, y_train: np.ndarray, n: int, seed: int = 0,
                     batch_size: int = 256) -> "AEDistanceRecorder":
        pick = probe_indices(y_train, n, seed=seed)
        return cls(trainer, x_train[pick], y_train[pick], seed=seed, batch_size=batch_size)

    def craft(self) -> torch.Tensor:
        attack = self.trainer.attack
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        out = []
        for start in range(0, len(self.y), self.batch_size):
            sl = slice(start, start + self.batch_size)
            out.append(attack.perturb(self.x[sl], self.y[sl], generator=generator))
        return torch.cat(out) if out else self.x[:0]

    def __call__(self, epoch: int, metrics: Dict[str, float]) -> None:
        current = self.craft()
        distance = float((current - self.previous).flatten(1).norm(dim=1).mean()) if len(current) else float("nan")
        self.previous = current
        metrics[METRIC] = distance
        self.history.append({"epoch": epoch, METRIC: distance})

"""PGD adversarial training (Madry et al.) as a subclass of ART's `AdversarialTrainerMadryPGD`.

It keeps ART's interface (`fit(x, y)` on numpy, `get_classifier()`), but the epoch loop is
tensor-native: the data stay on the device, the attack takes input-only gradients, and the LR
scheduler (any torch scheduler) is stepped once per epoch, not per batch as ART's trainer does.

Subclasses change one thing each through the hooks `craft`, `training_loss`, `on_batch_end`,
`on_epoch_end` and `extra_state` / `load_extra_state` (what a checkpoint must carry).

Reliability (see `art_reat.checkpoints` and `art_reat.faults`): checkpoints are written atomically
with a manifest (checksum); with ``seed`` set, every epoch's randomness is a function of
(seed, epoch): the global RNGs are re-seeded at the start of each epoch and the training attack's
random start draws from a generator seeded with (seed, epoch, batch), so that a run resumed from a
checkpoint continues exactly as the uninterrupted run. A stop request (``stop_signal``, set by a
SIGINT / SIGTERM handler) is honoured at the end of the current batch: the trainer writes a
mid-epoch checkpoint (model, optimiser, RNG states and the epoch's running sums) to ``last.pt`` and
raises `TrainingInterrupted`; resuming from it replays the epoch's loader position and continues
with the next batch. On such a mid-epoch resume `on_epoch_start` is not called again: what it sets
must be carried by `extra_state`. A NaN / inf loss stops training before the optimiser step
(`NonFiniteLoss`) and leaves the last checkpoint as it was.

Speed and several processes (issue 6; `art_reat.accel`, `art_reat.distributed`): with the classifier's
model wrapped by `art_reat.accel.accelerate`, the training forward runs inside `synchronized(model)`
(DDP under torchrun). With ``dist`` set, the loader is a `ShardedLoader`: the trainer hands the batch's
`BatchShard` to the attack (random start of the global batch) and to the classifier (TAIL on the
gathered batch), rescales the loss of uneven slices, agrees with the other ranks once per batch on a
stop request or a non-finite loss, and all-reduces the epoch's sums and counts (before a mid-epoch
checkpoint, written by rank 0, and at the end of the epoch; on a mid-epoch resume the other ranks
start from zero).
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
from art_reat.checkpoints import (capture_rng_state, derived_seed, restore_rng_state, rotate_epoch_checkpoints,
                                  seed_global_rngs, serialize, write_checkpoint)
from art_reat.accel import full_precision, synchronized
from art_reat.distributed import BatchShard, DistContext, agree_max, all_reduce_sum_
from art_reat.errors import NonFiniteLoss, TrainingInterrupted
from art_reat.evaluation import accuracy_report, predict_loader
from art_reat.faults import check_finite, signal_name

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
    :param seed: when set, per-epoch re-seeding and per-batch attack generators (exact resume).
    :param attack_chunk: rows per input-gradient pass of the training and validation attacks (speed
        only, see `TensorPGD`'s ``gradient_chunk``); None keeps the attacks' "auto".
    :param keep_last: also keep the ``keep_last`` most recent per-epoch checkpoints ``epoch_XXX.pt``.
    """

    def __init__(self, classifier, attack: Optional[TensorPGD] = None, *, nb_epochs: int = 80,
                 batch_size: int = 128, eps: float = 8 / 255, eps_step: float = 2 / 255, max_iter: int = 10,
                 scheduler=None, eval_attack_steps: int = 20, checkpoint_dir: Optional[str | Path] = None,
                 checkpoint_meta: Optional[dict] = None, callbacks: Sequence[EpochCallback] = (),
                 progress: bool = False, seed: Optional[int] = None, keep_last: int = 0,
                 attack_chunk: Optional[int] = None) -> None:
        # ART's __init__ would build its own numpy PGD and AdversarialTrainer; we only need the base.
        Trainer.__init__(self, classifier)
        self.nb_epochs = nb_epochs
        self.batch_size = batch_size
        self.attack = attack if attack is not None else self.build_attack(eps, eps_step, max_iter)
        self.eval_attack = TensorPGD(classifier, norm=self.attack.norm, eps=float(self.attack.eps),
                                     eps_step=float(self.attack.eps_step), max_iter=eval_attack_steps,
                                     batch_size=batch_size)
        if attack_chunk is not None:  # None: each attack's own ("auto": 32 rows on the CPU, whole batch on CUDA)
            for built in (self.attack, self.eval_attack):
                if isinstance(built, TensorPGD):
                    built.set_params(gradient_chunk=attack_chunk)
        self.scheduler = scheduler
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.callbacks: List[EpochCallback] = list(callbacks)
        self.progress = progress
        self.history: List[Dict[str, float]] = []
        self.start_epoch = 0
        self.best_metric = -math.inf
        # reliability
        self.seed = seed
        self.keep_last = int(keep_last or 0)
        self.check_finite = True
        self.stop_signal: Optional[int] = None  # set by a signal handler: stop after the current batch
        self.accepting_stop = False  # true inside fit_loader, where a stop request is honoured gracefully
        self.batch_generator: Optional[torch.Generator] = None  # the training attack's random start
        self._partial: Optional[dict] = None  # a mid-epoch checkpoint's running state, until used
        self._pending_rng: Optional[dict] = None  # RNG states of a loaded checkpoint, restored by fit_loader
        # several processes (torchrun; `art_reat.distributed`): set by `train()`, None in one process
        self.dist: Optional[DistContext] = None
        #: what the training AEs of the current epoch are predicted as, per class (train-mode logits
        #: before the optimiser step); summed over the ranks at a stop and at the end of the epoch, so
        #: that `on_epoch_end` sees the epoch's global counts (REAT's RBL weights come from them)
        self.adv_pred_counts = torch.zeros(classifier.nb_classes, dtype=torch.long, device=classifier.device)

    # ----------------------------------------------------------------------------- hooks
    def build_attack(self, eps: float, eps_step: float, max_iter: int) -> TensorPGD:
        return TensorPGD(self._classifier, eps=eps, eps_step=eps_step, max_iter=max_iter,
                         batch_size=self.batch_size)

    def craft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack.perturb(x, y, generator=self.batch_generator)

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
                             shuffle=True, seed=kwargs.get("seed", 0),
                             augment_policy=kwargs.get("augment_policy", "none"))
        val = None
        if validation_data is not None:
            val = DeviceLoader(validation_data[0], _labels(validation_data[1]), batch_size, device)
        self.fit_loader(train, val, nb_epochs=nb_epochs)

    # ----------------------------------------------------------------------------- the epoch loop
    def fit_loader(self, train_loader, val_loader=None, nb_epochs: Optional[int] = None) -> List[Dict[str, float]]:
        nb_epochs = nb_epochs or self.nb_epochs
        self.accepting_stop = True
        try:
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
                if self._agreed_stop() is not None:  # arrived after the epoch's last batch: its checkpoint is written
                    raise self._interrupted(f"after epoch {epoch + 1}/{nb_epochs}")
        finally:
            self.accepting_stop = False
        return self.history

    def _agreed_stop(self) -> Optional[int]:
        """The stop request; with several processes, the one any rank received (all ranks agree)."""
        if self.dist is None:
            return self.stop_signal
        agreed = agree_max([self.stop_signal or 0], self.dist, torch.device(self._classifier.device))[0]
        if agreed and self.stop_signal is None:
            self.stop_signal = agreed
        return self.stop_signal

    def _agree_on_batch(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], epoch: int, batch: int,
                        nb_batches: Optional[int]) -> Optional[int]:
        """Several processes, once per batch before the optimiser step: all ranks learn whether any
        rank has a non-finite loss (then all stop with `NonFiniteLoss`) or a stop request (then all
        stop after this batch). Returns the agreed stop signal (None: go on)."""
        bad = 0
        if self.check_finite:  # on the device: the all-reduce below is the batch's only host sync
            values = torch.stack([loss.detach().float().sum()] +
                                 [torch.as_tensor(v).detach().float().sum().to(loss.device) for v in terms.values()])
            bad = ~torch.isfinite(values).all()
        any_bad, stop = agree_max([bad, self.stop_signal or 0], self.dist, loss.device)
        if any_bad:
            self.dist.stopped_together = True  # every rank raises here: they may meet at a barrier to end
            check_finite(loss, terms, epoch, batch, self.nb_epochs, nb_batches, self._kept_note)  # raises if here
            where = f"epoch {epoch + 1}/{self.nb_epochs}, batch {batch + 1}" + (f"/{nb_batches}" if nb_batches else "")
            raise NonFiniteLoss(f"non-finite training loss on another process at {where}; training stopped before "
                                f"the optimiser step{self._kept_note()}; try a smaller --lr")
        if stop and self.stop_signal is None:
            self.stop_signal = stop
        return stop or None

    def _set_shard(self, shard: Optional[BatchShard]) -> None:
        """Tell the training attack (random start of the global batch) and the classifier (TAIL on the
        gathered batch) which slice of the global batch this rank holds."""
        if hasattr(self.attack, "shard"):
            self.attack.shard = shard
        self._classifier.batch_shard = shard

    def _interrupted(self, where: str) -> TrainingInterrupted:
        saved = f"checkpoint saved to {str(self.checkpoint_dir / 'last.pt')!r}" if self.checkpoint_dir else (
            "no checkpoint folder: call state_dict() to keep the state")
        if self.dist is not None:  # only ever raised after the ranks agreed to stop at this point
            self.dist.stopped_together = True
            if not self.dist.is_main:
                saved = f"rank {self.dist.rank} stopped with the others (rank 0 writes the checkpoint)"
        return TrainingInterrupted(f"{signal_name(self.stop_signal)} {where}: {saved}", self.stop_signal)

    def _begin_epoch(self, epoch: int) -> Optional[dict]:
        """RNG set-up of an epoch; returns the running state of a mid-epoch checkpoint of this epoch."""
        partial, self._partial = self._partial, None
        if partial is not None and int(partial["epoch"]) != epoch:
            partial = None
        if partial is None:
            restore_rng_state(self._pending_rng)
            if self.seed is not None:
                seed_global_rngs(derived_seed(self.seed, epoch))
        else:  # continue a mid-epoch checkpoint where it stopped: its RNG states are those after its last batch
            restore_rng_state(self._pending_rng)
        self._pending_rng = None
        return partial

    def _batch_generator(self, epoch: int, batch: int) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        device = torch.device(self._classifier.device)
        return torch.Generator(device=device).manual_seed(derived_seed(self.seed, epoch, batch))

    def train_epoch(self, epoch: int, loader) -> Dict[str, float]:
        model = self._classifier.model
        optimizer = self._classifier.optimizer
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        partial = self._begin_epoch(epoch)
        if partial is None:
            self.on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        device = self._classifier.device
        dist = self.dist
        # running sums stay on the device: no host sync per batch
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        term_sums: Dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device, dtype=torch.long)
        # what the training AEs are predicted as, per class (every method; Figs. 1/5/6/11 of the paper)
        adv_pred = self.adv_pred_counts = torch.zeros(self._classifier.nb_classes, device=device, dtype=torch.long)
        seen = 0
        skip = 0
        if partial is not None:
            skip, seen, lr = int(partial["batch"]), int(partial["seen"]), float(partial["lr"])
            loss_sum = partial["loss_sum"].to(device)
            correct = partial["correct"].to(device)
            adv_pred = self.adv_pred_counts = partial["adv_pred"].to(device)
            term_sums = {k: v.to(device) for k, v in partial["term_sums"].items()}
            if dist is not None and not dist.is_main:  # the saved sums are global: rank 0 carries them on
                seen = 0
                loss_sum, correct, adv_pred = loss_sum.zero_(), correct.zero_(), adv_pred.zero_()
                term_sums = {k: v.zero_() for k, v in term_sums.items()}
        nb_batches = len(loader) if hasattr(loader, "__len__") else None
        batches = _progress(loader, f"epoch {epoch + 1}/{self.nb_epochs}", self.progress)
        try:
            for batch, (x, y) in enumerate(batches):
                if batch < skip:  # replay the loader (its shuffling and augmentation) up to the checkpoint
                    continue
                self.batch_generator = self._batch_generator(epoch, batch)
                shard = getattr(loader, "current_shard", None) if dist is not None else None
                if dist is not None:
                    self._set_shard(shard)
                x_adv = self.craft(x, y)
                model.train()
                with synchronized(model):  # several processes: DDP's forward, gradients all-reduced
                    loss, logits, terms = self.training_loss(x_adv, y)
                agreed = None
                if dist is not None:
                    agreed = self._agree_on_batch(loss, terms, epoch, batch, nb_batches)
                elif self.check_finite:
                    check_finite(loss, terms, epoch, batch, self.nb_epochs, nb_batches, self._kept_note)
                optimizer.zero_grad(set_to_none=True)
                if shard is not None and shard.size * dist.world_size != shard.total:
                    # uneven slices: DDP averages over ranks; this makes it the global-batch mean
                    (loss * (shard.size * dist.world_size / shard.total)).backward()
                else:
                    loss.backward()
                optimizer.step()
                logits = logits.detach()
                self.on_batch_end(x_adv, y, logits)
                n = y.shape[0]
                seen += n
                loss_sum += loss.detach().double() * n
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value.detach().double() * n
                pred = logits.argmax(dim=1)
                correct += (pred == y).sum()
                # scatter_add, not bincount: bincount reads min/max back to the host (a sync per batch on CUDA)
                adv_pred.scatter_add_(0, pred, torch.ones_like(pred))
                stop = agreed if dist is not None else self.stop_signal  # ranks stop at the same batch
                if stop is not None and (nb_batches is None or batch + 1 < nb_batches):
                    if dist is not None:  # rank 0 writes the global running state
                        seen, loss_sum, correct, adv_pred, term_sums = _all_reduce_sums(
                            dist, seen, loss_sum, correct, adv_pred, term_sums)
                        self.adv_pred_counts = adv_pred
                    if dist is None or dist.is_main:
                        self._save_partial({"epoch": epoch, "batch": batch + 1, "seen": seen, "lr": lr,
                                            "loss_sum": loss_sum, "correct": correct, "adv_pred": adv_pred,
                                            "term_sums": term_sums})
                    total = f"/{nb_batches}" if nb_batches else ""
                    raise self._interrupted(f"during epoch {epoch + 1}/{self.nb_epochs}, after batch {batch + 1}{total}")
        finally:
            if dist is not None:
                self._set_shard(None)
        self.batch_generator = None
        if dist is not None:  # the epoch's sums and counts over all ranks
            seen, loss_sum, correct, adv_pred, term_sums = _all_reduce_sums(
                dist, seen, loss_sum, correct, adv_pred, term_sums)
            self.adv_pred_counts = adv_pred
        if self.scheduler is not None:
            self.scheduler.step()
        metrics = {
            "train/loss": float(loss_sum) / max(seen, 1),
            "train/adv_acc": float(correct) / max(seen, 1),
            "lr": lr,
            "epoch_seconds": time.perf_counter() - start,
        }
        metrics.update({f"train/loss_{name}": float(v) / max(seen, 1) for name, v in term_sums.items()})
        metrics.update({f"adv_pred/class_{c}": float(n) for c, n in enumerate(adv_pred.tolist())})
        return metrics

    def validate(self, loader) -> Dict[str, float]:
        model = self._classifier.model
        with full_precision(model):  # --amp trains in bf16; accuracies are measured in float32
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
        """Everything a resume needs: model, optimiser, scheduler, completed epochs, best-so-far,
        history, the method's `extra_state`, the global RNG states, and (`partial`, only in a
        checkpoint written on an interrupt) the position and running sums inside an epoch."""
        return {
            "model": self._classifier.model.state_dict(),
            "optimizer": self._classifier.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.start_epoch,
            "best_metric": self.best_metric,
            "history": self.history,
            "trainer": self.extra_state(),
            "meta": self.checkpoint_meta,
            "rng": capture_rng_state(),
            "seed": self.seed,
            "partial": None,
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
        # applied when training continues (fit_loader), so that nothing in between consumes them
        self._pending_rng = state.get("rng")
        self._partial = state.get("partial")

    def _kept_note(self) -> str:
        if self.checkpoint_dir is None:
            return ""
        if not (self.checkpoint_dir / "last.pt").exists():
            return "; no checkpoint was written yet"
        return f"; the last good checkpoint is kept: {str(self.checkpoint_dir / 'last.pt')!r}"

    def manifest(self, metrics: Optional[Dict[str, float]] = None, partial: Optional[dict] = None) -> dict:
        """What the manifest beside a checkpoint says (besides size, checksum and version)."""
        meta = self.checkpoint_meta
        out = {"epoch": self.start_epoch, "nb_epochs": self.nb_epochs, "best_metric": self.best_metric,
               "selection_metric": self.selection_metric, "metrics": dict(metrics or {}),
               "run_id": meta.get("run_id"), "num_classes": meta.get("num_classes"), "config": meta.get("config"),
               "trainer": type(self).__name__, "resumable": True}
        if partial is not None:
            out["partial"] = {"epoch": int(partial["epoch"]), "batch": int(partial["batch"])}
        return out

    def _save_partial(self, running: dict) -> None:
        """A mid-epoch checkpoint (written on an interrupt) to last.pt: resumable at the next batch."""
        if self.checkpoint_dir is None:
            return
        state = self.state_dict()
        partial = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in running.items()}
        partial["term_sums"] = {k: v.detach().cpu() for k, v in running["term_sums"].items()}
        state["partial"] = partial
        path = self.checkpoint_dir / "last.pt"
        write_checkpoint(serialize(state, path), path, self.manifest(partial=partial))

    def _save_checkpoints(self, metrics: Dict[str, float]) -> None:
        # with no validation split, the last epoch is the best one
        score = metrics.get(self.selection_metric, float(self.start_epoch))
        improved = score > self.best_metric
        if improved:
            self.best_metric = score
        if self.checkpoint_dir is None:
            return
        payload = serialize(self.state_dict(), self.checkpoint_dir / "last.pt")  # once; a failure changes no file
        manifest = self.manifest(metrics)
        # per-epoch copy and best first, last.pt last: last.pt never claims a best that is not on disk
        if self.keep_last > 0:
            write_checkpoint(payload, self.checkpoint_dir / f"epoch_{self.start_epoch:03d}.pt", manifest)
            rotate_epoch_checkpoints(self.checkpoint_dir, self.keep_last)
        if improved:
            write_checkpoint(payload, self.checkpoint_dir / "best.pt", manifest)
        write_checkpoint(payload, self.checkpoint_dir / "last.pt", manifest)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written file
    (a failure removes the temporary file). `write_checkpoint` also writes a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _all_reduce_sums(dist, seen: int, loss_sum: torch.Tensor, correct: torch.Tensor, adv_pred: torch.Tensor,
                     term_sums: Dict[str, torch.Tensor]):
    """The epoch's running sums and counts summed over the ranks (one float64 all-reduce; counts are
    exact below 2**53). Every rank has the same loss terms, reduced in sorted order."""
    names = sorted(term_sums)
    device = loss_sum.device
    packed = torch.cat([loss_sum.double().view(1), correct.double().view(1),
                        torch.tensor([float(seen)], dtype=torch.float64, device=device), adv_pred.double().view(-1)]
                       + [torch.as_tensor(term_sums[n], dtype=torch.float64, device=device).view(1) for n in names])
    all_reduce_sum_(packed, dist)
    k = adv_pred.numel()
    loss_sum = packed[0].clone()
    correct = packed[1].round().long()
    seen = int(round(float(packed[2])))
    adv_pred = packed[3:3 + k].round().long()
    term_sums = {n: packed[3 + k + i].clone() for i, n in enumerate(names)}
    return seen, loss_sum, correct, adv_pred, term_sums


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return np.argmax(y, axis=1) if y.ndim == 2 else y.astype(np.int64)


def _progress(iterable: Iterable, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

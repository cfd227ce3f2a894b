"""`train(config)`: data -> model -> ART classifier -> method's trainer -> MLflow run.

This is what `art-reat train` calls; everything it needs is in the `TrainConfig`.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from art_reat import distributed
from art_reat.accel import accelerate, full_precision, release_distributed
from art_reat.attacks import TensorPGD
from art_reat.config import TrainConfig
from art_reat.data import (DATASETS, DeviceLoader, class_groups, load_dataset, proportional_subset, stratified_split,
                           stratified_subset)
from art_reat.checkpoints import load_checkpoint, manifest_path
from art_reat.errors import ArtReatError, TrainingInterrupted, UsageError
from art_reat.faults import RunLock, StopOnSignals, check_free_space
from art_reat.evaluation import accuracy_report, predict_loader
from art_reat.losses import LOSSES, build_loss
from art_reat.models import MODELS, build_model
from art_reat.tracking import RunLogger, git_commit, tracked_run
from art_reat.trainers import METHODS, MethodParts, default_attack_steps, prepare_model


@dataclass
class PreparedData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    train_counts: np.ndarray
    default_eps: float


@dataclass
class TrainResult:
    run_id: Optional[str]  # None on the ranks other than 0 of a torchrun job (they track nothing)
    config: TrainConfig
    history: List[Dict[str, float]]
    test: Dict[str, dict]  # {"clean": report, "pgd20": report}, reports from `accuracy_report`; {} off rank 0
    checkpoint_dir: Optional[Path]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"invalid device {name!r}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_names(config: TrainConfig) -> None:
    """Fail on unknown names before any data is read or any run is opened."""
    DATASETS.get(config.dataset)
    MODELS.get(config.model)
    LOSSES.get(config.loss)
    METHODS.get(config.method)


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"output dir {str(path)!r} is not writable: {exc.strerror}") from None


def prepare_data(config: TrainConfig) -> PreparedData:
    splits = load_dataset(config.dataset, config.data_dir, ur=config.ur, seed=config.seed, download=config.download)
    x, y = splits.x_train, splits.y_train
    if config.train_subset is not None:
        # proportional: a subset of a long-tailed set stays long-tailed
        keep = proportional_subset(y, config.train_subset, seed=config.seed, num_classes=splits.num_classes)
        x, y = x[keep], y[keep]
    if config.val_fraction > 0:
        keep, held = stratified_split(y, config.val_fraction, seed=config.seed)
        x_val, y_val, x, y = x[held], y[held], x[keep], y[keep]
    else:
        x_val, y_val = x[:0], y[:0]
    x_test, y_test = splits.x_test, splits.y_test
    if config.eval_samples is not None:
        pick = stratified_subset(y_test, config.eval_samples, seed=config.seed, num_classes=splits.num_classes)
        x_test, y_test = x_test[pick], y_test[pick]
    counts = np.bincount(y, minlength=splits.num_classes)
    if (counts == 0).any():
        raise UsageError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no training image left: "
                         f"use a larger --train-subset or a smaller --val-fraction")
    return PreparedData(x, y, x_val, y_val, x_test, y_test, splits.num_classes, counts, splits.default_eps)


def build_parts(config: TrainConfig, data: PreparedData, device: torch.device) -> MethodParts:
    model = build_model(config.model, num_classes=data.num_classes, in_channels=data.x_train.shape[-1])
    model = prepare_model(config, model, data.num_classes).to(device)
    loss = build_loss(config.loss, data.train_counts)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    input_shape = (data.x_train.shape[-1],) + tuple(data.x_train.shape[1:3])
    return MethodParts(model, loss, optimizer, data.num_classes, data.train_counts, input_shape, device)


def evaluate_test(classifier, attack: TensorPGD, loader, num_classes: int, groups) -> Dict[str, dict]:
    model = classifier.model
    clean, labels = predict_loader(model, loader)
    robust, _ = predict_loader(model, loader, attack=attack)
    return {"clean": accuracy_report(clean, labels, num_classes, groups),
            f"pgd{attack.max_iter}": accuracy_report(robust, labels, num_classes, groups)}


def report_metrics(prefix: str, reports: Dict[str, dict]) -> Dict[str, float]:
    """Flatten {"clean": report, ...} into MLflow metric names like `test/clean_acc/tail`."""
    out: Dict[str, float] = {}
    for name, report in reports.items():
        out[f"{prefix}/{name}_acc"] = report["overall"]
        for group, value in report.get("groups", {}).items():
            out[f"{prefix}/{name}_acc/{group}"] = value
        for c, value in enumerate(report["per_class"]):
            out[f"{prefix}/{name}_acc/class_{c}"] = value
    return out


def _log_epoch(run: RunLogger, trainer, epoch: int, metrics: Dict[str, float]) -> None:
    run.log_metrics(metrics, step=epoch)
    for name, data in trainer.epoch_artifacts().items():
        run.log_dict(data, name)


def resume_command(run_id: str, config: TrainConfig) -> str:
    import shlex

    extra = f" --tracking-uri {shlex.quote(config.tracking_uri)}" if config.tracking_uri else ""
    return f"art-reat train --resume {run_id}{extra}"


def _interrupted(exc: TrainingInterrupted, run_id: str, config: TrainConfig, checkpoint_dir: Path) -> TrainingInterrupted:
    """The interrupt's message with the run's fate and how to resume it."""
    if (checkpoint_dir / "last.pt").exists():
        hint = f"resume with: {resume_command(run_id, config)}"
    else:
        hint = "no checkpoint was written yet: start the run again"
    return TrainingInterrupted(f"{exc}; MLflow run {run_id} marked KILLED; {hint}", exc.signum)


def train(config: TrainConfig, progress: bool = False, parent_run_id: Optional[str] = None,
          extra_tags: Optional[Dict[str, object]] = None, resume=None) -> TrainResult:
    """Train as `config` says, in a new MLflow run (a child of `parent_run_id` when given, e.g. by a
    sweep), tagged with `extra_tags` on top of the standard tags.

    ``resume`` (a `art_reat.resume.ResumePoint`, see `art_reat.resume.resume_training`) continues a
    checkpoint instead: its run is reopened and training goes on where the checkpoint stopped.
    SIGINT / SIGTERM stop training at the end of the current batch with a resumable checkpoint
    (`TrainingInterrupted`, run KILLED); a NaN / inf loss stops it with `NonFiniteLoss` (run FAILED).
    """
    config.validate()
    check_names(config)
    # several processes under torchrun (RANK, WORLD_SIZE, LOCAL_RANK): one process group for the run
    dist_ctx = distributed.setup(config.device)
    try:
        return _train(config, progress, parent_run_id, extra_tags, resume, dist_ctx)
    finally:
        # the normal end met at a barrier (`distributed.finish`) already; an agreed stop meets at one
        # here; after an error on one rank: no barrier
        distributed.end(dist_ctx)


def _train(config: TrainConfig, progress: bool, parent_run_id: Optional[str], extra_tags: Optional[Dict[str, object]],
           resume, dist_ctx: Optional[distributed.DistContext]) -> TrainResult:
    main = dist_ctx is None or dist_ctx.is_main
    device = dist_ctx.device if dist_ctx is not None else resolve_device(config.device)
    output_root = Path(config.output_dir)
    check_output_dir(output_root)
    if not main:
        dist_ctx.barrier()  # rank 0 reads (and downloads, caches) the data first
    data = prepare_data(config)
    if main and dist_ctx is not None:
        dist_ctx.barrier()
    if resume is not None:
        resume.check_data(config, data)
    config = replace(config, eps=config.eps if config.eps is not None else data.default_eps)
    config = replace(config, step_size=config.step_size if config.step_size is not None else config.eps / 4)
    if config.attack_steps is None:
        config = replace(config, attack_steps=default_attack_steps(config.method))
    groups = class_groups(data.num_classes, config.class_groups)

    seed_everything(config.seed)
    parts = build_parts(config, data, device)
    if resume is not None:
        resume.check_parts(config, parts)  # another model / class count: one line, before the run is touched
    scheduler = torch.optim.lr_scheduler.MultiStepLR(parts.optimizer, milestones=config.milestones,
                                                     gamma=config.lr_gamma)
    if not main:  # MLflow, checkpoints, validation and the final test are rank 0's
        with StopOnSignals() as guard:
            return _train_in_run(config, data, parts, scheduler, groups, device, _NoRun(), guard, None, False,
                                 resume, dist_ctx)
    check_free_space(output_root, parts.model, parts.optimizer, config.keep_last)
    tags = {"method": config.method, "dataset": config.dataset, "ur": config.ur, "model": config.model,
            "loss": config.loss, "seed": config.seed, "git_commit": git_commit(), "device": device.type}
    if dist_ctx is not None:
        tags["world_size"] = dist_ctx.world_size
    tags.update(extra_tags or {})
    reopen = resume.run_id if resume is not None else None
    if reopen is not None:
        tags = {"resumes": resume.resumes, "resumed_at_epoch": resume.epoch, "git_commit": tags["git_commit"],
                "device": device.type, **(extra_tags or {})}
    # a run is trained by one process at a time: a resume of a run whose process still lives is refused
    lock = RunLock(output_root / reopen, reopen).acquire() if reopen is not None else None
    try:
        with tracked_run(config.tracking_uri, config.experiment, config.run_name, tags, parent_run_id=parent_run_id,
                         run_id=reopen) as run, StopOnSignals() as guard:
            checkpoint_dir = output_root / run.run_id
            try:
                if lock is None:
                    lock = RunLock(checkpoint_dir, run.run_id).acquire()
                return _train_in_run(config, data, parts, scheduler, groups, device, run, guard, checkpoint_dir,
                                     progress, resume, dist_ctx)
            except TrainingInterrupted as exc:
                raise _interrupted(exc, run.run_id, config, checkpoint_dir) from None
    finally:
        if lock is not None:
            lock.release()


class _NoRun:
    """The run of ranks other than 0, which track nothing (MLflow logging is rank 0's)."""

    run_id = None

    def _skip(self, *args, **kwargs) -> None:
        return None

    log_params = log_metrics = log_dict = log_artifact = set_tags = _skip


def _train_in_run(config: TrainConfig, data: PreparedData, parts: MethodParts, scheduler, groups, device, run,
                  guard: StopOnSignals, checkpoint_dir: Optional[Path], progress: bool, resume,
                  dist_ctx: Optional[distributed.DistContext] = None) -> TrainResult:
    main = dist_ctx is None or dist_ctx.is_main
    continuing = resume is not None and resume.run_id is not None
    if continuing:
        run.log_dict(config.to_dict(), "config.json")  # --epochs / --keep-last may have changed
    else:  # (a `_NoRun` off rank 0 logs nothing)
        run.log_params(config.to_dict())
        run.log_params({"n_train": len(data.y_train), "n_val": len(data.y_val), "n_test": len(data.y_test)})
        run.log_dict(config.to_dict(), "config.json")
        run.log_dict({"train_counts": data.train_counts.tolist(), "groups": groups}, "data.json")
        if resume is not None:  # the checkpoint's run is not in this store: a new run continues it
            run.set_tags({"resumed_from_run": resume.source_run_id or "", "resumed_at_epoch": resume.epoch})
    trainer = METHODS.get(config.method)(
        config, parts, scheduler=scheduler, checkpoint_dir=checkpoint_dir,
        checkpoint_meta={"config": config.to_dict(), "num_classes": data.num_classes, "run_id": run.run_id,
                         "input_shape": list(parts.input_shape), "train_counts": data.train_counts.tolist()},
        progress=progress and main)
    trainer.seed = config.seed  # per-epoch / per-batch seeding: an exact resume
    trainer.keep_last = config.keep_last
    if resume is not None:
        trainer.load_state_dict(resume.state)
        if main:
            _log_missing_epochs(run, trainer)
    if config.record_ae_distance and main:  # before the logging callback, which then logs `ae_distance`
        from art_reat.trainers.ae_distance import AEDistanceRecorder

        trainer.callbacks.append(AEDistanceRecorder.for_training(
            trainer, data.x_train, data.y_train, config.record_ae_distance, seed=config.seed))
    if main:
        trainer.callbacks.append(lambda epoch, metrics: _log_epoch_or_fail(run, trainer, epoch, metrics,
                                                                           checkpoint_dir))
    classifier = trainer.get_classifier()
    # speed options and DDP, once the trainer is built (AWP copies the plain model for its proxy)
    accelerate(classifier, amp=config.amp, channels_last=config.channels_last, compile=config.compile,
               dist=dist_ctx)
    trainer.dist = dist_ctx
    train_loader = DeviceLoader(data.x_train, data.y_train, config.batch_size, device, augment=True,
                                shuffle=True, seed=config.seed, augment_policy=config.augment)
    if dist_ctx is not None:  # the same global batches on every rank; each keeps its slice
        train_loader = distributed.ShardedLoader(train_loader, dist_ctx.rank, dist_ctx.world_size)
    val_loader = (DeviceLoader(data.x_val, data.y_val, config.batch_size, device) if len(data.y_val) and main
                  else None)
    guard.trainer = trainer  # from here on SIGINT / SIGTERM stop at the end of a batch, with a checkpoint
    try:
        history = trainer.fit_loader(train_loader, val_loader, nb_epochs=config.epochs)
    finally:
        release_distributed(classifier.model)  # DDP goes before its process group (see accel.py)
    distributed.finish(dist_ctx)  # all ranks are done training; the final test is rank 0's alone
    if not main:
        return TrainResult(None, config, history, {}, None)

    # final report on the test set, with the checkpoint selected on the validation split
    best = checkpoint_dir / "best.pt"
    if best.exists():
        classifier.model.load_state_dict(load_checkpoint(best, device)["model"])
    test_loader = DeviceLoader(data.x_test, data.y_test, config.batch_size, device)
    with full_precision(classifier.model):  # --amp: the reported accuracies are float32 ones
        test = evaluate_test(classifier, trainer.eval_attack, test_loader, data.num_classes, groups)
    run.log_metrics(report_metrics("test", test), step=config.epochs)
    run.log_dict(test, "test_report.json")
    for name in ("best.pt", "last.pt"):
        if (checkpoint_dir / name).exists():
            run.log_artifact(checkpoint_dir / name, "checkpoints")
            if manifest_path(checkpoint_dir / name).exists():
                run.log_artifact(manifest_path(checkpoint_dir / name), "checkpoints")
    return TrainResult(run.run_id, config, history, test, checkpoint_dir)


def _log_epoch_or_fail(run: RunLogger, trainer, epoch: int, metrics: Dict[str, float], checkpoint_dir: Path) -> None:
    try:
        _log_epoch(run, trainer, epoch, metrics)
    except Exception as exc:  # a store gone or locked mid-run: the checkpoints are safe, say so in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ArtReatError(f"MLflow logging failed after epoch {epoch + 1} ({first}); the checkpoint of that epoch "
                           f"is kept in {str(checkpoint_dir)!r}") from None


def _log_missing_epochs(run: RunLogger, trainer) -> None:
    """Log the restored history's epochs that the run does not have yet (a new run continuing a
    copied checkpoint, or an epoch whose logging an interrupt cut off)."""
    logged = {m.step for m in run.client.get_metric_history(run.run_id, "train/loss")}
    for epoch, metrics in enumerate(trainer.history):
        if epoch not in logged:
            run.log_metrics(metrics, step=epoch)

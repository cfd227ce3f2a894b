"""`art-reat train --resume RUN_ID|CHECKPOINT`: continue an interrupted run (or train a finished one longer).

What is restored: model, optimiser, scheduler, the method's state (`extra_state`: REAT's RBL class
weights and prediction counts, ...), completed epochs, best-so-far metric, history, all RNG states
(torch CPU and CUDA, numpy, python `random`; the loader's epoch follows from the epoch) and, after
an interrupt, the position inside the epoch. The MLflow run of the checkpoint is reopened (status
RUNNING, then FINISHED / KILLED / FAILED as usual); if the checkpoint's run is not in the tracking
store (a checkpoint copied elsewhere), a new run is started with the checkpoint's history.

A resumed run keeps its saved configuration. Only the options in `RESUME_CHANGEABLE` (where the
run's files are and how long it trains: --epochs, --tracking-uri, --output-dir, --data-dir,
--download, --device, --keep-last, and the speed options --channels-last and --compile, which change
float rounding at most) may differ; any other option given with --resume must equal the
saved value, else it is an error (exit 2): silently training the rest of a run with another
learning rate would make its numbers meaningless.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from art_reat.checkpoints import describe_state_dict_error, load_checkpoint, manifest_path
from art_reat.config import TrainConfig
from art_reat.errors import ArtReatError, DataError, UsageError

#: the options a resumed run may change (they do not change what is computed, except --epochs,
#: which only extends or shortens the loop; the LR milestones stay as they are)
RESUME_CHANGEABLE = ("epochs", "tracking_uri", "output_dir", "data_dir", "download", "device", "keep_last",
                     "channels_last", "compile", "attack_chunk")


@dataclass
class ResumePoint:
    """A loaded checkpoint and the MLflow run it continues."""

    checkpoint: Path  # where the state was read from (for messages)
    state: dict
    source_run_id: Optional[str]  # the run id the checkpoint belongs to
    run_id: Optional[str]  # the run to reopen; None: the store does not have it, start a new run
    run_status: Optional[str]
    resumes: int  # how many times the run has been resumed, this time included

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def partial(self) -> Optional[dict]:
        return self.state.get("partial")

    @property
    def meta(self) -> dict:
        return self.state.get("meta") or {}

    def check_data(self, config: TrainConfig, data) -> None:
        """The data must be the run's: same class count, image shape and training class counts."""
        where = f"{config.dataset} data in {config.data_dir!r}"
        classes = self.meta.get("num_classes")
        if classes is not None and int(classes) != int(data.num_classes):
            raise DataError(f"checkpoint {str(self.checkpoint)!r} was trained with {classes} classes, but the "
                            f"{where} have {data.num_classes}: a run can only continue on its own data")
        shape = self.meta.get("input_shape")
        actual = [int(data.x_train.shape[-1]), int(data.x_train.shape[1]), int(data.x_train.shape[2])]
        if shape is not None and [int(v) for v in shape] != actual:
            raise DataError(f"checkpoint {str(self.checkpoint)!r} was trained on images of shape {list(shape)} "
                            f"(C, H, W), but the {where} are {actual}")
        counts = self.meta.get("train_counts")
        if counts is not None and [int(c) for c in counts] != [int(c) for c in data.train_counts]:
            raise DataError(f"checkpoint {str(self.checkpoint)!r} was trained on another training set (class counts "
                            f"{list(counts)[:10]}), the {where} give {data.train_counts.tolist()[:10]}")

    def check_parts(self, config: TrainConfig, parts) -> None:
        """Load model and optimiser states into freshly built parts: a checkpoint of another model,
        class count or optimiser is a one-line `DataError` naming the file, before any run is touched."""
        try:
            parts.model.load_state_dict(self.state["model"])
        except Exception as exc:
            raise DataError(f"checkpoint {str(self.checkpoint)!r} does not fit model {config.model!r} with "
                            f"{parts.num_classes} classes: {describe_state_dict_error(exc)}") from None
        try:
            parts.optimizer.load_state_dict(self.state["optimizer"])
        except Exception as exc:
            raise DataError(f"checkpoint {str(self.checkpoint)!r} holds an optimiser state that does not fit "
                            f"the model: {describe_state_dict_error(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def merge_config(saved: TrainConfig, overrides: Mapping[str, Any], source: str) -> TrainConfig:
    """The saved configuration with the changeable `overrides` applied; any other override that
    differs from the saved value is a `UsageError`."""
    values = saved.to_dict()
    requested = TrainConfig.from_dict({**values, **dict(overrides)})  # type coercion, unknown keys
    changed = [name for name in overrides
               if name not in RESUME_CHANGEABLE and getattr(requested, name) != getattr(saved, name)]
    if changed:
        shown = ", ".join(f"--{n.replace('_', '-')} {getattr(requested, n)!r} (saved: {getattr(saved, n)!r})"
                          for n in changed)
        allowed = ", ".join("--" + n.replace("_", "-") for n in RESUME_CHANGEABLE)
        raise UsageError(f"--resume continues {source} with its saved configuration, but {shown} differs; "
                         f"only {allowed} may change (start a new run to change anything else)")
    return requested


def _store_has(uri: Optional[str]) -> Tuple[str, bool]:
    """(resolved URI, whether a store is there): a missing SQLite file is not created by a lookup."""
    from art_reat.tracking.mlflow_tracking import DEFAULT_STORE_DIR, resolve_tracking_uri

    if uri is None:
        db = DEFAULT_STORE_DIR.resolve() / "mlflow.db"
        return f"sqlite:///{db}", db.is_file()
    if uri.startswith("sqlite:///"):
        return uri, Path(uri[len("sqlite:///"):]).is_file()
    return resolve_tracking_uri(uri), True


def _find_run(uri: str, run_id: str, exists: bool):
    """The MLflow run (None when the store has no such run); a broken store is an `ArtReatError`."""
    if not exists:
        return None
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        return client.get_run(run_id)
    except Exception as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower():
            return None
        raise ArtReatError(f"cannot open MLflow tracking store {uri!r}: {_first_line(exc)}") from None


def prepare_resume(target: str, overrides: Optional[Mapping[str, Any]] = None) -> Tuple[TrainConfig, ResumePoint]:
    """Find and verify the checkpoint of ``target`` (a run id, a checkpoint file or a run's
    checkpoint folder) and the configuration to continue with."""
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    overrides.pop("resume", None)
    uri, have_store = _store_has(overrides.get("tracking_uri"))
    path = Path(str(target))
    if path.is_dir():
        path = path / "last.pt"
        if not path.is_file():
            raise UsageError(f"--resume {target!r}: the folder has no last.pt checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        if path.is_file():
            state = load_checkpoint(path)
        elif path.suffix in (".pt", ".pth") or "/" in str(target) or "\\" in str(target):
            raise UsageError(f"checkpoint {str(target)!r} does not exist")
        else:
            run = _find_run(uri, str(target), have_store)
            if run is None:
                raise UsageError(f"--resume {target!r}: no such checkpoint file, and no run with that id in tracking "
                                 f"store {uri!r} (give --tracking-uri if the run is in another store)")
            path = _run_checkpoint(run, uri, overrides.get("output_dir"), Path(tmp))
            state = load_checkpoint(path)
        return _resume_point(target, path, state, overrides)


def _run_checkpoint(run, uri: str, output_dir: Optional[str], tmp: Path) -> Path:
    """The run's local last.pt (``<output_dir>/<run_id>/last.pt``), else its MLflow artifact."""
    run_id = run.info.run_id
    folder = output_dir or run.data.params.get("output_dir") or "outputs"
    local = Path(folder) / run_id / "last.pt"
    if local.is_file():
        return local
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        found = Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp)))
    except Exception:
        raise UsageError(f"run {run_id} has no resumable checkpoint: {str(local)!r} does not exist (give "
                         f"--output-dir if its checkpoints were moved) and the run has no checkpoints/last.pt "
                         f"artifact") from None
    try:  # the manifest, when it was logged, so that the download is verified too
        client.download_artifacts(run_id, f"checkpoints/{manifest_path(found).name}", str(tmp))
    except Exception:
        pass
    return found


def _resume_point(target: str, path: Path, state: dict, overrides: Dict[str, Any]) -> Tuple[TrainConfig, ResumePoint]:
    meta = state["meta"]
    try:
        saved = TrainConfig.from_dict(dict(meta["config"]))
    except UsageError as exc:
        raise DataError(f"checkpoint {str(path)!r} holds a configuration this version cannot use: {exc}") from None
    source_run = meta.get("run_id")
    config = merge_config(saved, overrides, f"run {source_run}" if source_run else f"checkpoint {str(path)!r}")
    config.validate()
    uri, have_store = _store_has(config.tracking_uri)
    run = _find_run(uri, source_run, have_store) if source_run else None
    if run is not None and run.info.lifecycle_stage != "active":
        run = None
    status = run.info.status if run is not None else None
    done = int(state["epoch"])
    partial = state.get("partial")
    least = done + (1 if partial else 0)
    if config.epochs < least:
        raise UsageError(f"invalid epochs {config.epochs}: checkpoint {str(path)!r} is already at epoch {least} "
                         f"(--epochs must be at least that)")
    if done >= config.epochs and partial is None and status == "FINISHED":
        raise UsageError(f"run {source_run} already finished its {config.epochs} epochs: give --epochs N with N > "
                         f"{done} to train it longer")
    resumes = int(run.data.tags.get("resumes", "0")) + 1 if run is not None else 1
    point = ResumePoint(path, state, source_run, run.info.run_id if run is not None else None, status, resumes)
    return config, point


def resume_training(target: str, overrides: Optional[Mapping[str, Any]] = None, progress: bool = False):
    """Python API of `art-reat train --resume`: returns the `TrainResult` of the completed run."""
    from art_reat.training import train

    config, point = prepare_resume(target, overrides)
    return train(config, progress=progress, resume=point)


__all__ = ["RESUME_CHANGEABLE", "ResumePoint", "merge_config", "prepare_resume", "resume_training"]

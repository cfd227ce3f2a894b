"""Load a trained model and its training configuration from an MLflow run or a checkpoint file."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from art_reat.config import TrainConfig
from art_reat.errors import ArtReatError, DataError, UsageError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: TrainConfig
    num_classes: int
    input_shape: tuple
    run_id: Optional[str]
    checkpoint: Path


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain data, never code.
    When its manifest (``<name>.json``) is beside it, size and SHA-256 are checked first."""
    from art_reat.checkpoints import load_checkpoint

    return load_checkpoint(path, device)


def download_run_checkpoint(run_id: str, tracking_uri: Optional[str], dst: Path) -> Path:
    from mlflow.tracking import MlflowClient

    from art_reat.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    try:
        client.get_run(run_id)
    except Exception:
        raise UsageError(f"unknown run id {run_id!r} in tracking store {resolve_tracking_uri(tracking_uri)!r}") from None
    for name in ("best.pt", "last.pt"):
        try:
            found = Path(client.download_artifacts(run_id, f"checkpoints/{name}", str(dst)))
        except Exception:
            continue
        try:  # its manifest, when logged, so that the download is verified
            client.download_artifacts(run_id, f"checkpoints/{Path(name).stem}.json", str(dst))
        except Exception:
            pass
        return found
    raise ArtReatError(f"run {run_id} has no checkpoints/best.pt or checkpoints/last.pt artifact")


def load_model(run_id: Optional[str] = None, checkpoint: Optional[str | Path] = None,
               tracking_uri: Optional[str] = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the trained model (architecture and method-specific head) and load its weights."""
    from art_reat.models import build_model
    from art_reat.trainers import prepare_model

    if (run_id is None) == (checkpoint is None):
        raise UsageError("give exactly one of --run-id and --checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(checkpoint) if checkpoint is not None else download_run_checkpoint(run_id, tracking_uri, Path(tmp))
        state = read_checkpoint(path, device)
    meta = state["meta"]
    config = TrainConfig.from_dict(meta["config"])
    num_classes = int(meta["num_classes"])
    input_shape = tuple(meta.get("input_shape", (3, 32, 32)))
    model = build_model(config.model, num_classes=num_classes, in_channels=input_shape[0])
    model = prepare_model(config, model, num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        from art_reat.checkpoints import describe_state_dict_error

        raise DataError(f"checkpoint {str(path)!r} does not fit model {config.model!r} with {num_classes} classes: "
                        f"{describe_state_dict_error(exc)}") from None
    return LoadedModel(model.to(device).eval(), config, num_classes, input_shape, run_id or meta.get("run_id"),
                       path if checkpoint is not None else Path(f"runs:/{run_id}/checkpoints/{path.name}"))

"""MLflow tracking: the default store under ./mlruns, runs that always end in a terminal state.

Default store: SQLite at `./mlruns/mlflow.db` with artifacts under `./mlruns/artifacts` (MLflow 3
needs an explicit opt-in for the plain file store; SQLite is its default backend and works with
`mlflow ui`). Any other URI given by the user is used as it is.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

from art_reat.errors import ArtReatError, TrainingInterrupted, UsageError

DEFAULT_STORE_DIR = Path("mlruns")
PARENT_RUN_TAG = "mlflow.parentRunId"  # how MLflow (and its UI) nests a child run under its parent


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """The user's URI, or the default SQLite store under ./mlruns (created if needed)."""
    if uri:
        return uri
    store = DEFAULT_STORE_DIR.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a SQLite store live beside the database, not in the current directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """A thin wrapper around one MLflow run (explicit client, no global fluent state)."""

    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, _param_str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]  # skip NaN
        for start in range(0, len(batch), 500):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start:start + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def tracked_run(tracking_uri: Optional[str], experiment: str, run_name: Optional[str] = None,
                tags: Optional[Mapping[str, Any]] = None, parent_run_id: Optional[str] = None,
                run_id: Optional[str] = None) -> Iterator[RunLogger]:
    """Open an MLflow run; end it FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any error): never left RUNNING.

    With `parent_run_id` the run is a child (nested) run of that run (MLflow's `mlflow.parentRunId` tag).
    With `run_id` the existing run is reopened (status RUNNING again, `tags` set on it), e.g. to
    resume an interrupted training, and terminated the same way.
    """
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    tags = dict(tags or {})
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    try:
        client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            run = open_run(client, run_id, uri)
            client.update_run(run_id, "RUNNING")
            for key, value in tags.items():
                client.set_tag(run_id, key, str(value))
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else client.create_experiment(experiment, artifact_location=_artifact_root(uri)))
            run = client.create_run(experiment_id, run_name=run_name,
                                    tags={k: str(v) for k, v in (tags or {}).items()})
    except ArtReatError:
        raise
    except Exception as exc:  # unreachable / locked / malformed store: one line, before any training
        raise ArtReatError(f"cannot open MLflow tracking store {uri!r}: {str(exc).splitlines()[0]}") from None
    logger = RunLogger(client, run.info.run_id)
    try:
        yield logger
    except (KeyboardInterrupt, TrainingInterrupted):
        _terminate(client, run.info.run_id, "KILLED")
        raise
    except BaseException:
        _terminate(client, run.info.run_id, "FAILED")
        raise
    else:
        _terminate(client, run.info.run_id, "FINISHED")


def open_run(client, run_id: str, uri: str):
    """The run `run_id` of the store (a one-line `UsageError` when unknown or deleted)."""
    try:
        run = client.get_run(run_id)
    except Exception:
        raise UsageError(f"unknown run id {run_id!r} in tracking store {uri!r}") from None
    if run.info.lifecycle_stage != "active":
        raise UsageError(f"run {run_id} in tracking store {uri!r} is deleted (restore it in MLflow first)")
    return run


def _terminate(client, run_id: str, status: str) -> None:
    """Set the terminal status; if the store is gone, say so instead of hiding the original error."""
    try:
        client.set_terminated(run_id, status)
    except Exception as exc:
        import sys

        print(f"Warning: could not mark MLflow run {run_id} {status}: {str(exc).splitlines()[0][:200]}",
              file=sys.stderr)


def _param_str(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's limit on a param value


def log_json_artifact(logger: RunLogger, data: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
        logger.log_artifact(path)

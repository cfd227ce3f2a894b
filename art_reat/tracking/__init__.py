"""Experiment tracking (MLflow)."""

from art_reat.tracking.mlflow_tracking import RunLogger, git_commit, resolve_tracking_uri, tracked_run

__all__ = ["RunLogger", "git_commit", "resolve_tracking_uri", "tracked_run"]

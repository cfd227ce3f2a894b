"""Helpers shared by several test modules (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import shutil
import traceback
from typing import List

from click.testing import CliRunner, Result

from cli.main import main


def invoke(args: List[str]) -> Result:
    """`art-reat ARGS` in-process (stdout and stderr kept apart)."""
    return CliRunner().invoke(main, args)


def describe(result: Result) -> str:
    """Exit code, output and any exception of a CliRunner result, for assertion messages."""
    text = f"exit code {result.exit_code}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        text += "\n--- exception\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


def fresh_mlflow_store(tmp_path_factory, name: str) -> str:
    """A fresh SQLite store, copied from a session-wide template (MLflow's schema is slow to create)."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        template.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    folder = tmp_path_factory.mktemp(name)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"

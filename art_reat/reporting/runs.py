"""The training runs a report is made of, read from MLflow, and their grouping over seeds.

A report takes the FINISHED training runs of an experiment (or the children of one sweep's parent
run), never the sweep parents or report runs themselves (tag `art_reat.kind`). Runs are grouped by
every configuration value that differs between them, except the seed and the fields that do not
change what is trained (where runs and data live, the device, Fig. 3's probe recording); the
method is always part of the group. When a group holds several finished runs with the same seed,
the most recent one is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from art_reat.config import TrainConfig
from art_reat.errors import UsageError
from art_reat.experiments.sweep import KIND_TAG, search_all_runs
from art_reat.tracking.mlflow_tracking import PARENT_RUN_TAG, _param_str, resolve_tracking_uri

# Config fields that never define a group: the seed (averaged over) and what does not change training.
NOT_GROUPED = ("seed", "run_name", "tracking_uri", "experiment", "output_dir", "download", "device", "data_dir",
               "record_ae_distance", "keep_last")
KEY_LABELS = {"method": "Method", "ur": "UR", "loss": "Loss", "dataset": "Dataset", "model": "Model"}


@dataclass
class RunRecord:
    """One finished training run: params (strings, as logged), tags and latest metric values."""

    run_id: str
    name: str
    start_time: int
    params: Dict[str, str]
    tags: Dict[str, str]
    metrics: Dict[str, float]
    client: object = field(default=None, repr=False)
    _histories: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict, repr=False)

    def param(self, name: str) -> str:
        """The logged value, or the field's default for runs logged before the field existed."""
        if name in self.params:
            return self.params[name]
        defaults = {f.name: f for f in fields(TrainConfig)}
        if name in defaults:
            f = defaults[name]
            value = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            return _param_str(value)
        return ""

    def history(self, key: str) -> List[Tuple[int, float]]:
        """[(step, value)] of a metric, sorted by step (the last value of a step wins)."""
        if key not in self._histories:
            points = self.client.get_metric_history(self.run_id, key) if self.client is not None else []
            by_step = {}
            for m in sorted(points, key=lambda m: (m.step, m.timestamp)):
                by_step[m.step] = m.value
            self._histories[key] = sorted(by_step.items())
        return self._histories[key]

    @property
    def num_classes(self) -> int:
        """Number of classes, from the per-class metrics it logged."""
        classes = [int(k.rsplit("class_", 1)[1]) for k in self.metrics if "/class_" in k
                   and k.rsplit("class_", 1)[1].isdigit()]
        return max(classes) + 1 if classes else 0

    def groups(self) -> Dict[str, List[int]]:
        from art_reat.data import class_groups

        n = self.num_classes
        return class_groups(n, self.param("class_groups") or "reference") if n else {}


def load_runs(experiment: str, tracking_uri: Optional[str] = None, parent_run_id: Optional[str] = None
              ) -> List[RunRecord]:
    """The finished training runs of `experiment` (children of `parent_run_id` when given), oldest first."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as exc:
        raise UsageError(f"cannot read MLflow tracking store {uri!r}: {str(exc).splitlines()[0]}") from None
    if found is None:
        raise UsageError(f"no experiment {experiment!r} in tracking store {uri!r}")
    query = "attributes.status = 'FINISHED'"
    if parent_run_id:
        try:
            client.get_run(parent_run_id)
        except Exception:
            raise UsageError(f"unknown parent run {parent_run_id!r} in tracking store {uri!r}") from None
        query += f" and tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"
    records = []
    for run in search_all_runs(client, [found.experiment_id], query):
        tags = dict(run.data.tags)
        if KIND_TAG in tags or "method" not in tags:
            continue  # sweep parents, report runs, anything that is not a training run
        records.append(RunRecord(run.info.run_id, run.info.run_name or run.info.run_id, run.info.start_time or 0,
                                 dict(run.data.params), tags, dict(run.data.metrics), client))
    records.sort(key=lambda r: (r.start_time, r.run_id))
    return records


@dataclass
class RunGroup:
    """Runs that differ only by seed."""

    key: Tuple[str, ...]  # values of `GroupedRuns.key_fields`, as logged
    runs: List[RunRecord]

    @property
    def seeds(self) -> List[str]:
        return [r.param("seed") for r in self.runs]


@dataclass
class GroupedRuns:
    key_fields: List[str]  # config fields that define the groups ("method" first)
    groups: List[RunGroup]  # in order of their first run

    def label(self, group: RunGroup, short: bool = True) -> str:
        """`reat` or `reat, UR=100, loss=ce` (the key fields)."""
        parts = []
        for name, value in zip(self.key_fields, group.key):
            value = format_value(value)
            parts.append(value if name == "method" else f"{KEY_LABELS.get(name, name)}={value}")
        return ", ".join(parts)

    @property
    def key_labels(self) -> List[str]:
        return [KEY_LABELS.get(k, k) for k in self.key_fields]


def format_value(value: str) -> str:
    """`100.0` -> `100`; other strings as they are."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:g}" if np.isfinite(number) else str(value)


def group_runs(runs: Sequence[RunRecord]) -> GroupedRuns:
    """Group over seeds (see the module doc)."""
    names = [f.name for f in fields(TrainConfig) if f.name not in NOT_GROUPED]
    varying = [n for n in names if len({r.param(n) for r in runs}) > 1]
    key_fields = ["method"] + [n for n in varying if n != "method"]
    by_key: Dict[Tuple[str, ...], Dict[str, RunRecord]] = {}
    for run in runs:  # oldest first: a later run with the same seed replaces an earlier one
        key = tuple(run.param(n) for n in key_fields)
        by_key.setdefault(key, {})[run.param("seed")] = run
    groups = [RunGroup(key, sorted(seeds.values(), key=lambda r: (r.start_time, r.run_id)))
              for key, seeds in by_key.items()]
    groups.sort(key=lambda g: min(r.start_time for r in g.runs))
    return GroupedRuns(key_fields, groups)

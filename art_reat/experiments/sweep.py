"""Sweeps: the product of several values of any `TrainConfig` field, trained one after the other as
child runs of one parent MLflow run, and resumable.

Layout in MLflow:

- the parent run (tag `art_reat.kind=sweep`, run name `sweep` or `--run-name`) holds the swept
  values as params `sweep/<field>`, the fixed values as the other params, and `sweep.json` (every
  child's values, config hash, run id and what happened to it);
- each child is a normal training run (`art_reat.training.train`) with the MLflow tag
  `mlflow.parentRunId` (the UI nests it under the parent), `art_reat.config_hash` (a hash of its
  configuration without the fields that only say where runs go) and `art_reat.sweep_index`.

Resume: a sweep started again with the same configuration (same values, same experiment) finds
its parent run by the tag `art_reat.sweep_hash`, reopens it, and skips every child whose config
hash already has a FINISHED child run under that parent; unfinished (FAILED, KILLED, RUNNING after
a crash) children are trained again from scratch, as new runs. `fresh=True` starts a new parent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from art_reat.config import TrainConfig
from art_reat.errors import ArtReatError, UsageError
from art_reat.tracking.mlflow_tracking import PARENT_RUN_TAG, resolve_tracking_uri, tracked_run

KIND_TAG = "art_reat.kind"  # "sweep" on a parent run, "report" on a report run; absent on training runs
SWEEP_HASH_TAG = "art_reat.sweep_hash"
CONFIG_HASH_TAG = "art_reat.config_hash"
INDEX_TAG = "art_reat.sweep_index"
# Fields that say where a run goes, not what is trained: not part of a configuration's identity.
LOCATION_FIELDS = ("experiment", "run_name", "tracking_uri", "output_dir", "download", "keep_last")


def config_hash(config: TrainConfig) -> str:
    """Identity of what a configuration trains: sha256 of its fields except `LOCATION_FIELDS`."""
    values = {k: v for k, v in config.to_dict().items() if k not in LOCATION_FIELDS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class SweepPlan:
    base: Dict[str, Any]  # values every child shares (config file + single-valued flags)
    axes: Dict[str, List[Any]]  # field -> the values to sweep, in the order given
    children: List[Tuple[Dict[str, Any], TrainConfig]] = field(default_factory=list)  # (swept values, config)

    @property
    def varying(self) -> Dict[str, List[Any]]:
        """The axes with more than one value."""
        return {k: v for k, v in self.axes.items() if len(v) > 1}

    def sweep_hash(self) -> str:
        """Identity of the sweep: its set of child configurations (flag order does not matter)."""
        parts = sorted(config_hash(config) for _, config in self.children)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def plan_sweep(base: Mapping[str, Any], axes: Mapping[str, Sequence[Any]]) -> SweepPlan:
    """Every combination of `axes` values (the first axis varies slowest) on top of `base`; each
    configuration is built and validated here, so that a bad value fails before anything runs."""
    known = {f.name for f in fields(TrainConfig)}
    for name in list(base) + list(axes):
        if name not in known:
            raise UsageError(f"unknown config key {name!r}")
    for name, values in axes.items():
        if len(values) == 0:
            raise UsageError(f"no value to sweep for {name.replace('_', '-')}")
        if name in LOCATION_FIELDS:
            raise UsageError(f"{name.replace('_', '-')} cannot be swept: all children go to one place")
    axes = {k: list(dict.fromkeys(_hashable(v) for v in values)) for k, values in axes.items()}
    plan = SweepPlan(dict(base), {k: [_unhashable(v) for v in values] for k, values in axes.items()})
    from art_reat.training import check_names

    seen = set()
    for combo in itertools.product(*plan.axes.values()):
        values = dict(zip(plan.axes, combo))
        config = TrainConfig.from_dict({**plan.base, **values}).validate()
        check_names(config)
        digest = config_hash(config)
        if digest in seen:
            continue
        seen.add(digest)
        plan.children.append((values, config))
    return plan


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _unhashable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def child_run_name(prefix: Optional[str], values: Mapping[str, Any], varying: Mapping[str, Sequence]) -> str:
    """`pgd-at-ur100-seed0`: the swept values that vary, after `prefix` when given."""
    parts = [prefix] if prefix else []
    for name in varying:
        value = values[name]
        text = ",".join(map(str, value)) if isinstance(value, list) else (f"{value:g}" if isinstance(value, float)
                                                                            else str(value))
        parts.append(text if name == "method" else f"{name.replace('_', '-')}{text}")
    return "-".join(parts) or "run"


@dataclass
class ChildOutcome:
    index: int
    values: Dict[str, Any]
    config_hash: str
    run_id: Optional[str]
    status: str  # "trained", "skipped" (finished before), "failed", "killed" or "pending" (not reached)


@dataclass
class SweepResult:
    parent_run_id: str
    resumed: bool
    children: List[ChildOutcome]

    @property
    def trained(self) -> List[ChildOutcome]:
        return [c for c in self.children if c.status == "trained"]

    @property
    def skipped(self) -> List[ChildOutcome]:
        return [c for c in self.children if c.status == "skipped"]


def _client(tracking_uri: Optional[str]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def search_all_runs(client, experiment_ids: Sequence[str], filter_string: str = "") -> list:
    """Every run matching the filter (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent(client, experiment: str, sweep_hash: str) -> Optional[str]:
    """The most recent parent run of this sweep in the experiment, if any."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = search_all_runs(client, [found.experiment_id],
                           f"tags.`{SWEEP_HASH_TAG}` = '{sweep_hash}' and tags.`{KIND_TAG}` = 'sweep'")
    runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    return runs[0].info.run_id if runs else None


def finished_children(client, experiment: str, parent_run_id: str) -> Dict[str, str]:
    """config hash -> run id of the FINISHED children of a parent run."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = search_all_runs(client, [found.experiment_id],
                           f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'")
    return {r.data.tags[CONFIG_HASH_TAG]: r.info.run_id for r in runs if CONFIG_HASH_TAG in r.data.tags}


def run_sweep(plan: SweepPlan, fresh: bool = False, progress: bool = False,
              on_child: Optional[Callable[[ChildOutcome, int], None]] = None) -> SweepResult:
    """Train the children of `plan` one after the other under one parent run (see the module doc).

    `on_child(outcome, total)` is called before a child trains (status "pending") and after it is
    trained or skipped. A failing child ends the sweep (parent FAILED); run it again to resume.
    """
    from art_reat import training  # looked up at call time, so that tests can replace `training.train`

    experiment = plan.base.get("experiment") or TrainConfig.experiment
    tracking_uri = plan.base.get("tracking_uri")
    sweep_hash = plan.sweep_hash()
    client = _client(tracking_uri)
    try:
        parent_id = None if fresh else find_parent(client, experiment, sweep_hash)
    except Exception as exc:
        raise ArtReatError(f"cannot read MLflow tracking store {resolve_tracking_uri(tracking_uri)!r}: "
                           f"{str(exc).splitlines()[0]}") from None
    resumed = parent_id is not None
    context = tracked_run(tracking_uri, experiment, plan.base.get("run_name") or "sweep",
                          {KIND_TAG: "sweep", SWEEP_HASH_TAG: sweep_hash}, run_id=parent_id)  # reopened if found
    outcomes = [ChildOutcome(i, values, config_hash(config), None, "pending")
                for i, (values, config) in enumerate(plan.children)]
    with context as parent:
        if not resumed:
            varying = plan.varying
            parent.log_params({k: v for k, v in plan.children[0][1].to_dict().items()
                               if k not in varying and k != "run_name"})
            parent.log_params({f"sweep/{k}": v for k, v in varying.items()})
            parent.log_params({"sweep/n_children": len(plan.children)})
        done = finished_children(client, experiment, parent.run_id)
        try:
            for outcome, (values, config) in zip(outcomes, plan.children):
                if outcome.config_hash in done:
                    outcome.run_id, outcome.status = done[outcome.config_hash], "skipped"
                else:
                    if on_child is not None:
                        on_child(outcome, len(outcomes))
                    config.run_name = child_run_name(plan.base.get("run_name"), values, plan.varying or values)
                    try:
                        result = training.train(config, progress=progress, parent_run_id=parent.run_id,
                                                extra_tags={CONFIG_HASH_TAG: outcome.config_hash,
                                                            INDEX_TAG: outcome.index})
                    except BaseException as exc:
                        outcome.status = "killed" if isinstance(exc, KeyboardInterrupt) else "failed"
                        raise
                    outcome.run_id, outcome.status = result.run_id, "trained"
                if on_child is not None:
                    on_child(outcome, len(outcomes))
        finally:
            parent.log_dict({"sweep_hash": sweep_hash, "axes": plan.axes,
                             "children": [vars(o) for o in outcomes]}, "sweep.json")
    return SweepResult(parent.run_id, resumed, outcomes)

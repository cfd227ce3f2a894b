"""`make_report`: what `art-reat report` does, from reading the runs to logging the figures.

Tables go to the returned text (the command prints it) and, with `out_dir`, to
`accuracy.{md,csv,tex}` and `training_cost.{md,csv,tex}`; figures are PNG files in `out_dir`.
With `log=True` the tables and figures are logged as MLflow artifacts under `report/`: to the
sweep's parent run when `parent_run` is given, otherwise to a new run named `report` (tag
`art_reat.kind=report`, ignored by later reports) in the same experiment, so that no training run
is changed and a figure drawing on many runs lives in one place.

A figure whose data no run has is skipped, with the reason in `Report.skipped`:
- `adv_pred_distribution.png`: metrics `adv_pred/class_c` (every trainer logs them per epoch);
- `per_class_accuracy.png`: per-class clean and robust test accuracy;
- `robust_acc_vs_steps.png`: `audit/robust_acc/pgdN` (`art-reat attack --audit`), else two or more
  `robust_acc/pgdN`;
- `ae_distance.png`: metric `ae_distance` (`--record-ae-distance N` in training);
- `tsne_<run>.png`: only for the runs named in `tsne_runs` (the model is loaded and attacked);
- `training_cost.png`: metric `epoch_seconds`.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from art_reat.errors import UsageError
from art_reat.reporting import figures
from art_reat.reporting.runs import GroupedRuns, RunGroup, RunRecord, group_runs, load_runs
from art_reat.reporting.tables import (FORMATS, Table, accuracy_table, cost_table, default_group_attack, render,
                                       run_value)

EXTENSIONS = {"md": "md", "csv": "csv", "latex": "tex"}


@dataclass
class ReportConfig:
    experiment: str
    tracking_uri: Optional[str] = None
    parent_run: Optional[str] = None
    fmt: str = "md"
    out_dir: Optional[str] = None
    log: bool = True
    group_attack: Optional[str] = None  # attack of the head/body/tail columns and the per-class figure; None: auto
    tsne_runs: Sequence[str] = ()
    tsne_samples: int = 500
    tsne_attack: str = "pgd20"
    data_dir: Optional[str] = None  # for t-SNE; default: the run's
    device: str = "auto"
    seed: int = 0

    def validate(self) -> "ReportConfig":
        if self.fmt not in FORMATS:
            raise UsageError(f"invalid format {self.fmt!r}: must be one of {', '.join(FORMATS)}")
        if self.tsne_samples < 2:
            raise UsageError(f"invalid tsne-samples {self.tsne_samples!r}: must be an integer >= 2")
        from art_reat.attacks import parse_attack

        for name in (self.group_attack, self.tsne_attack):
            if name not in (None, "clean"):
                parse_attack(name)
        return self


@dataclass
class Report:
    grouped: GroupedRuns
    accuracy: Table
    cost: Table
    text: str
    files: Dict[str, Path] = field(default_factory=dict)  # name -> written file (kept only with out_dir)
    skipped: Dict[str, str] = field(default_factory=dict)  # figure -> why it was not drawn
    logged_to: Optional[str] = None


# ----------------------------------------------------------------------------- figure data


def _mean_rows(arrays: List[np.ndarray]) -> Optional[np.ndarray]:
    arrays = [a for a in arrays if a is not None and a.size]
    if not arrays:
        return None
    n = min(len(a) for a in arrays)
    return np.mean([a[:n] for a in arrays], axis=0)


def adv_pred_shares(run: RunRecord) -> Optional[np.ndarray]:
    """[epochs, C] shares of the training AEs predicted as each class, from `adv_pred/class_c`."""
    if "adv_pred/class_0" not in run.metrics:
        return None
    num_classes = max(int(k.rsplit("_", 1)[1]) for k in run.metrics if k.startswith("adv_pred/class_")) + 1
    histories = [dict(run.history(f"adv_pred/class_{c}")) for c in range(num_classes)]
    epochs = sorted(set.intersection(*(set(h) for h in histories)))
    if not epochs:
        return None
    counts = np.array([[h[e] for h in histories] for e in epochs], dtype=np.float64)
    return counts / np.clip(counts.sum(axis=1, keepdims=True), 1e-12, None)


def per_class(group: RunGroup, attack: str) -> Optional[np.ndarray]:
    rows = []
    for run in group.runs:
        n = run.num_classes
        values = [run_value(run, attack, f"class_{c}") for c in range(n)]
        if n and all(v is not None for v in values):
            rows.append(np.asarray(values, dtype=np.float64))
    return np.nanmean(rows, axis=0) if rows and len({len(r) for r in rows}) == 1 else None


def steps_curve(run: RunRecord) -> Dict[int, float]:
    """{steps: accuracy} from the audit (`audit/robust_acc/pgdN`), else from `robust_acc/pgdN`."""
    for prefix in ("audit/robust_acc/", "robust_acc/"):
        points = {int(m[1]): v for k, v in run.metrics.items() if (m := re.fullmatch(re.escape(prefix) + r"pgd(\d+)", k))}
        if len(points) >= 2:
            return points
    return {}


def _average_curves(curves: List[Dict[int, float]]) -> Dict[int, float]:
    keys = sorted({k for c in curves for k in c})
    return {k: float(np.mean([c[k] for c in curves if k in c])) for k in keys}


def _train_counts(run: RunRecord) -> Optional[List[float]]:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            import json

            path = run.client.download_artifacts(run.run_id, "data.json", tmp)
            return json.loads(Path(path).read_text()).get("train_counts")
    except Exception:
        return None


def draw_figures(grouped: GroupedRuns, out: Path, group_attack: str, cost: Table) -> Tuple[Dict[str, Path], Dict[str, str]]:
    files: Dict[str, Path] = {}
    skipped: Dict[str, str] = {}
    labels = {id(g): grouped.label(g) for g in grouped.groups}
    groups_of_classes = next((r.groups() for g in grouped.groups for r in g.runs if r.num_classes), None)

    shares = {labels[id(g)]: _mean_rows([adv_pred_shares(r) for r in g.runs]) for g in grouped.groups}
    shares = {k: v for k, v in shares.items() if v is not None}
    if shares:
        first = grouped.groups[0].runs[0]
        files["adv_pred_distribution.png"] = figures.adv_pred_distribution_figure(
            shares, out / "adv_pred_distribution.png", groups_of_classes, _train_counts(first))
    else:
        skipped["adv_pred_distribution.png"] = "no run has adv_pred/class_c metrics"

    accuracy = {}
    for g in grouped.groups:
        clean, robust = per_class(g, "clean"), per_class(g, group_attack)
        if clean is not None or robust is not None:
            accuracy[labels[id(g)]] = {k: v for k, v in (("clean", clean), ("robust", robust)) if v is not None}
    if accuracy:
        files["per_class_accuracy.png"] = figures.per_class_accuracy_figure(
            accuracy, out / "per_class_accuracy.png", groups_of_classes)
    else:
        skipped["per_class_accuracy.png"] = "no run has per-class test accuracy"

    curves = {}
    for g in grouped.groups:
        found = [c for c in (steps_curve(r) for r in g.runs) if c]
        if found:
            curves[labels[id(g)]] = _average_curves(found)
    if curves:
        files["robust_acc_vs_steps.png"] = figures.attack_steps_figure(curves, out / "robust_acc_vs_steps.png")
    else:
        skipped["robust_acc_vs_steps.png"] = "no run has audit/robust_acc/pgdN (art-reat attack --audit)"

    distances = {}
    for g in grouped.groups:
        per_run = [dict(r.history("ae_distance")) for r in g.runs if "ae_distance" in r.metrics]
        if per_run:
            distances[labels[id(g)]] = sorted(_average_curves(per_run).items())
    if distances:
        files["ae_distance.png"] = figures.ae_distance_figure(distances, out / "ae_distance.png")
    else:
        skipped["ae_distance.png"] = "no run has the ae_distance metric (train with --record-ae-distance N)"

    seconds = {labels[id(g)]: (row.cells[0].mean, row.cells[0].se) for g, row in zip(grouped.groups, cost.rows)
               if not np.isnan(row.cells[0].mean)}
    if seconds:
        files["training_cost.png"] = figures.training_cost_figure(seconds, out / "training_cost.png")
    else:
        skipped["training_cost.png"] = "no run has the epoch_seconds metric"
    return files, skipped


def tsne_for_run(run_id: str, config: ReportConfig, out: Path) -> Path:
    """Load a run's model, attack a stratified test subset, and draw the t-SNE of its features."""
    import torch

    from art_reat.attacks import ThreatModel, build_attack
    from art_reat.data import class_groups, load_dataset, stratified_subset
    from art_reat.estimators import LongTailClassifier
    from art_reat.evaluation.loading import load_model
    from art_reat.training import resolve_device

    device = resolve_device(config.device)
    loaded = load_model(run_id, None, config.tracking_uri, device)
    train_config = loaded.config
    splits = load_dataset(train_config.dataset, config.data_dir or train_config.data_dir, ur=train_config.ur,
                          seed=train_config.seed, download=False)
    n = min(config.tsne_samples, len(splits.y_test))
    pick = stratified_subset(splits.y_test, n, seed=config.seed, num_classes=splits.num_classes)
    x, y = splits.x_test[pick], splits.y_test[pick]
    attack = None
    if config.tsne_attack != "clean":
        classifier = LongTailClassifier(loaded.model, torch.nn.CrossEntropyLoss(), loaded.num_classes,
                                        input_shape=loaded.input_shape, device=device)
        attack = build_attack(config.tsne_attack, classifier, ThreatModel.for_norm("linf", train_config.eps),
                              seed=config.seed)
    groups = class_groups(loaded.num_classes, train_config.class_groups)
    title = (f"{train_config.method} ({run_id[:8]}), {config.tsne_attack} examples of {len(y)} test images")
    return figures.tsne_figure(loaded.model, x, y, attack, groups, out / f"tsne_{run_id[:8]}.png", title=title,
                               seed=config.seed)


# ----------------------------------------------------------------------------- the report


def render_report(accuracy: Table, cost: Table, fmt: str) -> str:
    if fmt == "md":
        return f"### {accuracy.title}\n\n{render(accuracy, fmt)}\n### {cost.title}\n\n{render(cost, fmt)}"
    return render(accuracy, fmt) + "\n" + render(cost, fmt)


def make_report(config: ReportConfig) -> Report:
    config.validate()
    runs = load_runs(config.experiment, config.tracking_uri, config.parent_run)
    if not runs:
        where = f"run {config.parent_run}" if config.parent_run else f"experiment {config.experiment!r}"
        raise UsageError(f"no finished training run in {where}")
    grouped = group_runs(runs)
    group_attack = config.group_attack or default_group_attack(runs)
    accuracy = accuracy_table(grouped, group_attack)
    cost = cost_table(grouped)
    report = Report(grouped, accuracy, cost, render_report(accuracy, cost, config.fmt))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(config.out_dir) if config.out_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        ext = EXTENSIONS[config.fmt]
        for name, table in (("accuracy", accuracy), ("training_cost", cost)):
            path = out / f"{name}.{ext}"
            path.write_text(render(table, config.fmt))
            report.files[path.name] = path
        files, report.skipped = draw_figures(grouped, out, group_attack, cost)
        report.files.update(files)
        for run_id in config.tsne_runs:
            path = tsne_for_run(run_id, config, out)
            report.files[path.name] = path
        if config.log:
            report.logged_to = _log(config, report, len(runs))
        if not config.out_dir:
            report.files = {}
    return report


def _log(config: ReportConfig, report: Report, n_runs: int) -> str:
    from mlflow.tracking import MlflowClient

    from art_reat.experiments.sweep import KIND_TAG
    from art_reat.tracking import RunLogger, resolve_tracking_uri, tracked_run

    if config.parent_run:
        run = RunLogger(MlflowClient(tracking_uri=resolve_tracking_uri(config.tracking_uri)), config.parent_run)
        for path in report.files.values():
            run.log_artifact(path, "report")
        return config.parent_run
    with tracked_run(config.tracking_uri, config.experiment, "report", {KIND_TAG: "report"}) as run:
        run.log_params({"report/n_runs": n_runs, "report/groups": len(report.grouped.groups),
                        "report/group_attack": config.group_attack or "auto"})
        for path in report.files.values():
            run.log_artifact(path, "report")
        return run.run_id

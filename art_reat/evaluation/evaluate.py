"""`evaluate(AttackConfig)`: what `art-reat attack` does, from loading the model to logging results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from art_reat.attacks import ThreatModel, parse_attack
from art_reat.errors import UsageError
from art_reat.evaluation.loading import LoadedModel, load_model
from art_reat.evaluation.suite import SuiteResult, audit, run_suite

DEFAULT_ATTACKS = ["pgd20", "pgd100", "cw100", "aa"]


@dataclass
class AttackConfig:
    run_id: Optional[str] = None
    checkpoint: Optional[str] = None
    tracking_uri: Optional[str] = None
    data_dir: Optional[str] = None  # default: the training run's
    attacks: List[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    adaptive_scale: Optional[float] = None  # adds pgdN-xA for every pgdN
    norm: str = "linf"
    eps: Optional[float] = None  # default: the run's training eps (L-inf) or 1.0 (L2)
    step_size: Optional[float] = None  # default: eps / 4 (L-inf) or eps / 5 (L2)
    eval_samples: Optional[int] = None  # stratified test subset; None = the whole test set
    seed: int = 0
    batch_size: int = 256
    aa_batch_size: int = 500
    audit: bool = False
    device: str = "auto"
    state_dir: str = "outputs/attack_state"  # per-batch resume files

    def attack_names(self) -> List[str]:
        names = list(dict.fromkeys(a.strip() for a in self.attacks if a.strip()))
        specs = [parse_attack(n) for n in names]  # fails early on a bad name
        if self.adaptive_scale is not None:
            if not self.adaptive_scale > 0:
                raise UsageError(f"invalid adaptive scale {self.adaptive_scale!r}: must be a number > 0")
            for spec in specs:
                if spec.family == "pgd" and spec.scale is None:
                    names.append(f"{spec.name}-x{self.adaptive_scale:g}")
        return list(dict.fromkeys(names))

    def validate(self) -> "AttackConfig":
        if (self.run_id is None) == (self.checkpoint is None):
            raise UsageError("give exactly one of --run-id and --checkpoint")
        for name in ("batch_size", "aa_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"invalid {name.replace('_', '-')} {getattr(self, name)!r}: must be an integer >= 1")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise UsageError(f"invalid eval-samples {self.eval_samples!r}: must be a positive integer")
        self.attack_names()
        ThreatModel.for_norm(self.norm, self.eps, self.step_size)  # checks norm / eps / step when given
        return self


@dataclass
class Evaluation:
    suite: SuiteResult
    audit: Optional[SuiteResult]
    loaded: LoadedModel
    logged_to: Optional[str]


def metric_label(name: str, norm: str) -> str:
    return name if norm == "linf" else f"{name}-{norm}"


def suite_metrics(result: SuiteResult) -> Dict[str, float]:
    """`clean_acc`, `robust_acc/<attack>` (+ `/head`, `/class_3`, ...) and adaptive drops."""
    out: Dict[str, float] = {}
    for name, report in result.reports.items():
        key = "clean_acc" if name == "clean" else f"robust_acc/{metric_label(name, result.threat.norm)}"
        out[key] = report["overall"]
        for group, value in report.get("groups", {}).items():
            out[f"{key}/{group}"] = value
        for c, value in enumerate(report["per_class"]):
            out[f"{key}/class_{c}"] = value
    for name, report in result.reports.items():
        spec = parse_attack(name) if name != "clean" else None
        if spec is not None and spec.scale is not None and f"pgd{spec.steps}" in result.reports:
            base = result.reports[f"pgd{spec.steps}"]["overall"]
            out[f"robust_acc_drop/{metric_label(name, result.threat.norm)}"] = base - report["overall"]
    return out


def evaluate(config: AttackConfig, on_chunk=None) -> Evaluation:
    from art_reat.data import class_groups, load_dataset, stratified_subset
    from art_reat.estimators import LongTailClassifier
    from art_reat.training import resolve_device

    config.validate()
    names = config.attack_names()
    device = resolve_device(config.device)
    loaded = load_model(config.run_id, config.checkpoint, config.tracking_uri, device)
    train_config = loaded.config
    eps = config.eps if config.eps is not None else (train_config.eps if config.norm == "linf" else None)
    threat = ThreatModel.for_norm(config.norm, eps, config.step_size)

    splits = load_dataset(train_config.dataset, config.data_dir or train_config.data_dir, ur=train_config.ur,
                          seed=train_config.seed, download=False)
    x, y = splits.x_test, splits.y_test
    if config.eval_samples is not None:
        pick = stratified_subset(y, config.eval_samples, seed=config.seed, num_classes=splits.num_classes)
        x, y = x[pick], y[pick]
    groups = class_groups(loaded.num_classes, train_config.class_groups)
    classifier = LongTailClassifier(loaded.model, torch.nn.CrossEntropyLoss(), loaded.num_classes,
                                    input_shape=loaded.input_shape, device=device)
    common = dict(groups=groups, batch_size=config.batch_size, aa_batch_size=config.aa_batch_size, seed=config.seed,
                  state_dir=Path(config.state_dir),
                  identity={"checkpoint": str(loaded.checkpoint), "run_id": loaded.run_id}, on_chunk=on_chunk)
    suite = run_suite(classifier, x, y, names, threat, loaded.num_classes, **common)
    audit_result = audit(classifier, x, y, threat, loaded.num_classes, **common) if config.audit else None
    logged_to = _log(config, loaded, suite, audit_result)
    return Evaluation(suite, audit_result, loaded, logged_to)


def _log(config: AttackConfig, loaded: LoadedModel, suite: SuiteResult, audit_result: Optional[SuiteResult]) -> Optional[str]:
    """Log to the training run (when it exists in the store); returns its id or None."""
    from mlflow.tracking import MlflowClient

    from art_reat.tracking import RunLogger, resolve_tracking_uri

    if loaded.run_id is None:
        return None
    client = MlflowClient(tracking_uri=resolve_tracking_uri(config.tracking_uri))
    try:
        client.get_run(loaded.run_id)
    except Exception:
        return None  # a checkpoint copied away from its store: results are printed only
    run = RunLogger(client, loaded.run_id)
    metrics = suite_metrics(suite)
    report = {"config": asdict(config), "suite": suite.to_dict()}
    if audit_result is not None:
        metrics.update({f"audit/{k}": v for k, v in suite_metrics(audit_result).items() if "/class_" not in k})
        metrics["audit/flags"] = float(len(audit_result.flags))
        report["audit"] = audit_result.to_dict()
    run.log_metrics(metrics)
    suffix = "" if suite.threat.norm == "linf" else f"_{suite.threat.norm}"
    run.log_dict(report, f"attack_report{suffix}.json")
    return loaded.run_id

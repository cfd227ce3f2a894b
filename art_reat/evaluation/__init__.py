"""Evaluation: accuracy reports, the attack suite, gradient-masking audit, `art-reat attack`."""

from art_reat.evaluation.metrics import accuracy_report, per_class_accuracy, predict_loader
from art_reat.evaluation.suite import SuiteResult, audit, run_suite

__all__ = ["SuiteResult", "accuracy_report", "audit", "per_class_accuracy", "predict_loader", "run_suite"]

"""Evaluation: accuracy reports and (later) the attack suite."""

from art_reat.evaluation.metrics import accuracy_report, per_class_accuracy, predict_loader

__all__ = ["accuracy_report", "per_class_accuracy", "predict_loader"]

"""Experiments: sweeps of training runs as nested MLflow runs."""

from art_reat.experiments.sweep import (ChildOutcome, SweepPlan, SweepResult, config_hash, plan_sweep,
                                        run_sweep)

__all__ = ["ChildOutcome", "SweepPlan", "SweepResult", "config_hash", "plan_sweep", "run_sweep"]

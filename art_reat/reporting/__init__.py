"""Reports: the paper's tables and figures from the MLflow runs of an experiment or a sweep."""

from art_reat.reporting.report import Report, ReportConfig, make_report
from art_reat.reporting.runs import GroupedRuns, RunRecord, group_runs, load_runs
from art_reat.reporting.tables import Table, accuracy_table, cost_table, mean_se, render

__all__ = ["GroupedRuns", "Report", "ReportConfig", "RunRecord", "Table", "accuracy_table", "cost_table",
           "group_runs", "load_runs", "make_report", "mean_se", "render"]

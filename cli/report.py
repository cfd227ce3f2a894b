"""`art-reat report`: the paper's tables (stdout) and figures (PNG, MLflow) from an experiment's runs."""

from __future__ import annotations

from typing import Any

import click

from cli.common import CONTEXT, reports_errors


@click.command(context_settings=CONTEXT)
@click.option("--experiment", required=True, help="MLflow experiment whose finished training runs are reported.")
@click.option("--tracking-uri", help="MLflow tracking URI. [sqlite:///./mlruns/mlflow.db]")
@click.option("--parent-run", help="Only the children of this sweep parent run; the report is logged to it.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex"]), default="md", show_default=True,
              help="Table format (md and latex: best value per column in bold).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Folder for the tables and PNG figures.")
@click.option("--no-log", is_flag=True, help="Do not log the report to MLflow (default: to --parent-run, or to a "
              "new run named 'report').")
@click.option("--group-attack", help="Attack of the head/body/tail columns and of the per-class figure. "
              "[pgd20; the training's PGD-N when no run has PGD-20]")
@click.option("--tsne-run", "tsne_runs", multiple=True, help="Draw the t-SNE of this run's adversarial test "
              "features (loads its model; repeatable).")
@click.option("--tsne-samples", type=int, default=500, show_default=True, help="Stratified test images for t-SNE.")
@click.option("--tsne-attack", default="pgd20", show_default=True, help="Attack making the t-SNE's examples "
              "(or clean).")
@click.option("--data-dir", help="Data folder for t-SNE. [the run's]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (t-SNE only).")
@reports_errors("Interrupted.")
def report(no_log: bool, tsne_runs, **options: Any) -> None:
    """Tables (mean and standard error over seeds) and figures of the paper from an experiment's runs."""
    import os

    from art_reat.reporting import ReportConfig, make_report

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for our messages
    result = make_report(ReportConfig(log=not no_log, tsne_runs=tuple(tsne_runs), **options))
    click.echo(result.text, nl=False)
    for name, reason in result.skipped.items():
        click.echo(f"skipped {name}: {reason}", err=True)
    if result.files:
        click.echo(f"wrote {len(result.files)} file(s) to {options['out_dir']}", err=True)
    if result.logged_to:
        click.echo(f"logged to MLflow run {result.logged_to} (artifacts under report/)", err=True)

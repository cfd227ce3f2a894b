"""`art-reat attack`: evaluate a trained model against the attack suite and log to its run."""

from __future__ import annotations

from typing import Any, Optional

import click

from cli.common import CONTEXT, comma_list, reports_errors


@click.command(context_settings=CONTEXT)
@click.option("--run-id", help="MLflow run of the training (its best checkpoint is evaluated).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="A checkpoint file instead of a run.")
@click.option("--tracking-uri", help="MLflow tracking URI. [sqlite:///./mlruns/mlflow.db]")
@click.option("--data-dir", help="Data folder. [the training run's]")
@click.option("--attacks", callback=comma_list, default="pgd20,pgd100,cw100,aa", show_default=True,
              help="Comma-separated: pgdN (CE), cwN (CW margin, kappa 50), aa (standard AutoAttack), "
                   "pgdN-xA (PGD on CE(A * logits)).")
@click.option("--adaptive-scale", type=float, help="Add the logit-scaled variant pgdN-xA of every pgdN attack "
              "and report the drop (the paper uses 10 against RoBal's gradient masking).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", type=float, help="Attack radius. [the run's eps for linf, 1.0 for l2]")
@click.option("--step-size", type=float, help="PGD step size. [eps/4 for linf, eps/5 for l2]")
@click.option("--eval-samples", type=int, help="Stratified test subset (N/C per class). [all]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset and random starts.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--aa-batch-size", type=int, default=500, show_default=True,
              help="AutoAttack batch: the unit of resume after an interruption.")
@click.option("--audit", is_flag=True, help="Gradient-masking diagnostics: robust accuracy against PGD steps "
              "(10, 20, 50, 100) and logit scales (1, 10, 100), with warnings.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--state-dir", default="outputs/attack_state", show_default=True,
              help="Where finished batches are kept so that an interrupted evaluation resumes.")
@reports_errors("Interrupted: finished batches are kept in --state-dir; run the same command again to resume.")
def attack(**options: Any) -> None:
    """Evaluate a trained model: clean, PGD, CW, AutoAttack and adaptive attacks, per class and group."""
    from art_reat.evaluation.evaluate import AttackConfig, evaluate

    config = AttackConfig(**options)
    progress = _Progress()
    try:
        result = evaluate(config, on_chunk=progress)
    finally:
        progress.close()  # so that an error message starts on its own line
    _print_suite("Robust accuracy (%)", result.suite)
    if result.audit is not None:
        _print_suite("Gradient-masking audit (%)", result.audit, per_class=False)
        for flag in result.audit.flags:
            click.echo(f"WARNING: {flag}")
        if not result.audit.flags:
            click.echo("audit: no sign of gradient masking")
    if result.logged_to:
        click.echo(f"logged to MLflow run {result.logged_to}")
    else:
        click.echo("not logged: the checkpoint's run is not in this tracking store")


class _Progress:
    def __init__(self) -> None:
        self.bar = None
        self.name: Optional[str] = None

    def __call__(self, name: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if name != self.name:
            self.close()
            self.name, self.bar = name, tqdm(total=total, desc=name, leave=False, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_suite(title: str, suite, per_class: bool = True) -> None:
    reports = suite.reports
    groups = list(reports["clean"].get("groups", {}))
    click.echo(f"{title}: {suite.n_samples} test images, {suite.threat.norm} eps={suite.threat.eps:.5g}, "
               f"step={suite.threat.step:.5g}")
    click.echo(f"{'attack':<14}{'overall':>9}" + "".join(f"{g:>9}" for g in groups))
    for name, report in reports.items():
        click.echo(f"{name:<14}{100 * report['overall']:>9.2f}" +
                   "".join(f"{100 * report['groups'][g]:>9.2f}" for g in groups))
    if per_class:
        n = len(reports["clean"]["per_class"])
        click.echo(f"{'per class':<14}" + "".join(f"{c:>7}" for c in range(n)))
        for name, report in reports.items():
            click.echo(f"{name:<14}" + "".join(f"{100 * a:>7.1f}" for a in report["per_class"]))

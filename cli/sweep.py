"""`art-reat sweep`: the options of `train`, each repeatable; the product runs as nested MLflow runs."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import click

from cli.common import CONTEXT, reports_errors
from cli.options import train_options


@click.command(context_settings=CONTEXT)
@train_options(repeatable=True)
@click.option("--fresh", is_flag=True, help="Start a new parent run even if this sweep ran (or was interrupted) "
              "before; by default it resumes and skips the children that already finished.")
@click.option("--dry-run", is_flag=True, help="List the child configurations and exit.")
@reports_errors("Interrupted: the sweep's parent run was marked KILLED; run the same command again to resume "
                "(finished children are skipped).")
def sweep(config_file: Optional[str], fresh: bool, dry_run: bool, **options: Any) -> None:
    """Train every combination of repeated options as child runs of one parent MLflow run.

    E.g. `--method pgd-at --method reat --seed 0 --seed 1` trains four runs, one after the other.

    Every option of `train` may be given several times, except those that say where runs go
    (--config, --experiment, --run-name, --tracking-uri, --output-dir, --download). A sweep started
    again with the same options resumes: children that already FINISHED are skipped.
    """
    from art_reat.config import read_config_file
    from art_reat.distributed import torchrun_env
    from art_reat.errors import UsageError
    from art_reat.experiments import plan_sweep, run_sweep

    if torchrun_env() is not None:  # every rank would open its own parent run
        raise UsageError("a sweep runs in one process: under torchrun, train each configuration with "
                         "`torchrun ... --no-python art-reat train ...`")
    base: Dict[str, Any] = read_config_file(config_file) if config_file else {}
    axes: Dict[str, List[Any]] = {}
    for name, value in options.items():
        if isinstance(value, tuple):
            if len(value) > 1:
                axes[name] = list(value)
            elif value:
                base[name] = value[0]
        elif value is not None:
            base[name] = value
    plan = plan_sweep(base, axes)
    varying = plan.varying
    click.echo(f"sweep: {len(plan.children)} run(s)" +
               (" over " + ", ".join(f"{k.replace('_', '-')} {_fmt_values(v)}" for k, v in varying.items())
                if varying else ""))
    if dry_run:
        for index, (values, _) in enumerate(plan.children):
            click.echo(f"  [{index + 1}] " + (_fmt_child(values, varying) or "(single run)"))
        return

    def announce(outcome, total: int) -> None:
        label = _fmt_child(outcome.values, varying) or "(single run)"
        if outcome.status == "pending":
            click.echo(f"[{outcome.index + 1}/{total}] {label}: training")
        elif outcome.status == "skipped":
            click.echo(f"[{outcome.index + 1}/{total}] {label}: finished before (run {outcome.run_id}), skipped")
        else:
            click.echo(f"[{outcome.index + 1}/{total}] {label}: run {outcome.run_id} {outcome.status}")

    result = run_sweep(plan, fresh=fresh, progress=True, on_child=announce)
    click.echo(f"parent run {result.parent_run_id}{' (resumed)' if result.resumed else ''}: "
               f"{len(result.trained)} trained, {len(result.skipped)} skipped")


def _fmt_values(values: List[Any]) -> str:
    return "{" + ", ".join(_fmt(v) for v in values) + "}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _fmt_child(values: Dict[str, Any], varying: Dict[str, List[Any]]) -> str:
    return " ".join(f"{k.replace('_', '-')}={_fmt(values[k])}" for k in varying)

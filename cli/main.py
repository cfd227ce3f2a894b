"""The `art-reat` command line: parses options, calls the library, prints results.

Errors the user can act on (`art_reat.errors.ArtReatError`) become one line on stderr and exit
code 2 (bad usage or input) or 1 (runtime failure); no traceback.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import click

from cli.common import CONTEXT, reports_errors
from cli.options import train_options


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="art-reat")
def main() -> None:
    """Adversarial training on long-tailed data, built on IBM's Adversarial Robustness Toolbox."""


@main.command(context_settings=CONTEXT)
@train_options()
@click.option("--resume", metavar="RUN_ID|CHECKPOINT",
              help="Continue an interrupted run (or train a finished one longer with a larger --epochs): its "
                   "MLflow run id, a checkpoint file (last.pt) or a run's checkpoint folder. The run's saved "
                   "configuration is used; only --epochs, --tracking-uri, --output-dir, --data-dir, --download, "
                   "--device, --keep-last, --channels-last and --compile may be given besides (other options must equal "
                   "the saved values).")
@reports_errors("Interrupted: the MLflow run was marked KILLED.")
def train(config_file: Optional[str], resume: Optional[str], **options: Any) -> None:
    """Adversarially train a model on a long-tailed dataset and track it in MLflow.

    SIGINT (Ctrl-C) or SIGTERM stops at the end of the current batch with a resumable checkpoint
    (exit 130 / 143, run KILLED); `--resume RUN_ID` continues it exactly where it stopped.
    """
    from art_reat.config import TrainConfig, read_config_file
    from art_reat.training import train as run_training

    values: Dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in options.items() if v is not None})
    if resume is not None:
        from art_reat.resume import resume_training

        result = resume_training(resume, values, progress=True)
    else:
        config = TrainConfig.from_dict(values)
        result = run_training(config, progress=True)
    if result.run_id is not None:  # under torchrun only rank 0 has a run to report
        _print_summary(result)


def _print_summary(result) -> None:
    last = result.history[-1] if result.history else {}
    click.echo(f"run {result.run_id}  ({result.config.method}, {result.config.dataset} UR={result.config.ur:g}, "
               f"{result.config.model}, {len(result.history)} epochs)")
    if last:
        click.echo(f"last epoch: loss {last['train/loss']:.4f}  train adv acc {last['train/adv_acc']:.4f}  "
                   f"{last['epoch_seconds']:.1f} s")
    groups = list(next(iter(result.test.values())).get("groups", {}))
    header = f"{'test':<10}{'overall':>9}" + "".join(f"{g:>9}" for g in groups)
    click.echo(header)
    for name, report in result.test.items():
        row = f"{name:<10}{100 * report['overall']:>8.2f}%"
        row += "".join(f"{100 * report['groups'][g]:>8.2f}%" for g in groups)
        click.echo(row)
    click.echo(f"checkpoints: {result.checkpoint_dir}")


from cli.attack import attack  # noqa: E402  (each command in its own module)
from cli.report import report  # noqa: E402
from cli.sweep import sweep  # noqa: E402

main.add_command(attack)
main.add_command(sweep)
main.add_command(report)

if __name__ == "__main__":
    main()

"""The `art-reat` command line: parses options, calls the library, prints results.

Errors the user can act on (`art_reat.errors.ArtReatError`) become one line on stderr and exit
code 2 (bad usage or input) or 1 (runtime failure); no traceback.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import click

from cli.common import CONTEXT, reports_errors

def _milestones(ctx, param, value: Optional[str]):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 60,75") from None


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="art-reat")
def main() -> None:
    """Adversarial training on long-tailed data, built on IBM's Adversarial Robustness Toolbox."""


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/JSON file of options; flags override it.")
@click.option("--dataset", help="cifar10lt, cifar100lt, cifar10, cifar100, cifar10-bs, cifar100-bs, tinyimagenetlt or npz.")
@click.option("--ur", type=float, help="Imbalance ratio N_max / N_min of the long-tailed training set (>= 1). [100]")
@click.option("--data-dir", help="Folder holding {cifar10,cifar100}/{train,test}.npz or torchvision files. [./data]")
@click.option("--download/--no-download", default=None, help="Let torchvision download missing CIFAR files.")
@click.option("--method", help="Training method: pgd-at, reat, ... [pgd-at]")
@click.option("--loss", help="Long-tail loss of the outer minimisation: ce, focal, cb, ldam, bsl. [bsl]")
@click.option("--model", help="resnet18, preact-resnet18, wrn-28-10, wrn-34-10, small-cnn. [resnet18]")
@click.option("--epochs", type=int, help="Training epochs. [80]")
@click.option("--batch-size", type=int, help="Batch size. [128]")
@click.option("--lr", type=float, help="SGD learning rate. [0.1]")
@click.option("--milestones", callback=_milestones, help="Epochs where the LR is multiplied by --lr-gamma. [60,75]")
@click.option("--lr-gamma", type=float, help="LR decay factor at each milestone. [0.1]")
@click.option("--weight-decay", type=float, help="SGD weight decay. [5e-4]")
@click.option("--eps", type=float, help="L-inf radius of the training attack, in [0,1] units. [dataset default, 8/255]")
@click.option("--step-size", type=float, help="Attack step size. [eps / 4]")
@click.option("--attack-steps", type=int, help="PGD steps of the training attack. [method default: 10, RoBal 5]")
@click.option("--eval-attack-steps", type=int, help="PGD steps for validation and the final test. [20]")
@click.option("--rbl", help="REAT attack re-balancing: reference (released code: true-label weighted CE; "
              "cannot move the adversarial examples), logit (CE(z + log w): pushes them to rarely "
              "predicted classes), rw, rws, enr, brw, none. [reference]")
@click.option("--tail", help="REAT feature regulariser: reference (released code's value and gradient), "
              "paper (Eq. 3), none. [reference]")
@click.option("--tail-weight", type=float, help="Weight lambda of the TAIL term. [1.0]")
@click.option("--class-groups", help="Head/body/tail rule: reference (released code) or paper. [reference]")
@click.option("--robal-m", type=float, help="RoBal margin m. [0.1; 0.2 for 100 classes]")
@click.option("--robal-s", type=float, help="RoBal logit scale s of the loss and of inference. [10]")
@click.option("--robal-tau-b", type=float, help="RoBal training prior shift tau_b. [1.2; 0 for 100 classes]")
@click.option("--robal-tau-m", type=float, help="RoBal class-aware margin tau_m. [0]")
@click.option("--robal-beta", type=float, help="RoBal TRADES weight beta. [6; 3 for 100 classes]")
@click.option("--robal-tau-p", type=float, help="RoBal inference prior shift tau_p. [0.1; 1.5 for 100 classes]")
@click.option("--robal-gamma", type=float, help="RoBal cosine-classifier gamma (0.0625: CIFAR-100 'R'). [0.03125]")
@click.option("--robal-margin-on", help="Logits of RoBal's margin loss: natural (TRADES form) or adversarial. "
              "[natural]")
@click.option("--robal-lr-schedule", help="RoBal LR schedule: intended (--milestones) or released (the released "
              "code: x lr-gamma every epoch from the first milestone on). [intended]")
@click.option("--seed", type=int, help="Seed of the LT subset, splits, init and augmentation. [0]")
@click.option("--device", help="auto, cpu or cuda[:N]. [auto]")
@click.option("--train-subset", type=int, help="Stratified subset of the training set (smoke runs).")
@click.option("--eval-samples", type=int, help="Stratified test subset for the final report. [all]")
@click.option("--val-fraction", type=float, help="Per-class held-out fraction for checkpoint selection. [0.05]")
@click.option("--experiment", help="MLflow experiment name. [art-reat]")
@click.option("--run-name", help="MLflow run name.")
@click.option("--tracking-uri", help="MLflow tracking URI. [sqlite:///./mlruns/mlflow.db]")
@click.option("--output-dir", help="Folder for checkpoints (one sub-folder per run). [outputs]")
@reports_errors("Interrupted: the MLflow run was marked KILLED.")
def train(config_file: Optional[str], **options: Any) -> None:
    """Adversarially train a model on a long-tailed dataset and track it in MLflow."""
    from art_reat.config import TrainConfig, read_config_file
    from art_reat.training import train as run_training

    values: Dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in options.items() if v is not None})
    config = TrainConfig.from_dict(values)
    result = run_training(config, progress=True)
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

main.add_command(attack)

if __name__ == "__main__":
    main()

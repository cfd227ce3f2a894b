"""The options of `art-reat train`, in one list shared by `art-reat train` and `art-reat sweep`.

`train_options()` adds them to a command as `train` takes them; `train_options(repeatable=True)`
lets every option that changes what is trained be given several times (`--seed 0 --seed 1`), as
the sweep takes them; the options that say where runs go (config file, store, experiment, run
name, output folder, download) stay single-valued.
"""

from __future__ import annotations

from typing import Callable

import click

# Options that say where runs go (or how data are fetched), not what is trained: given once to a sweep.
SINGLE_VALUED = ("--config", "--download/--no-download", "--experiment", "--run-name", "--tracking-uri", "--output-dir",
                 "--keep-last", "--amp/--no-amp", "--channels-last/--no-channels-last", "--compile/--no-compile",
                 "--attack-chunk")


def _parse_milestones(value: str):
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 60,75") from None


def _milestones(ctx, param, value):
    """`60,75` -> [60, 75]; for a repeatable option, a tuple of such lists."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_parse_milestones(v) for v in value)
    return _parse_milestones(value)


def train_options(repeatable: bool = False) -> Callable[[Callable], Callable]:
    """Decorator adding the options of `art-reat train` to a click command (see the module doc)."""

    def option(*decls, **attrs):
        if repeatable and decls[0] not in SINGLE_VALUED:
            attrs["multiple"] = True
        return click.option(*decls, **attrs)

    options = [
        option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/JSON file of options; flags override it."),
        option("--dataset", help="cifar10lt, cifar100lt, cifar10, cifar100, cifar10-bs, cifar100-bs, tinyimagenetlt or npz."),
        option("--ur", type=float, help="Imbalance ratio N_max / N_min of the long-tailed training set (>= 1). [100]"),
        option("--data-dir", help="Folder holding {cifar10,cifar100}/{train,test}.npz or torchvision files. [./data]"),
        option("--download/--no-download", default=None, help="Let torchvision download missing CIFAR files."),
        option("--method", help="Training method: pgd-at, reat, robal, srat, trades, mart, awp. [pgd-at]"),
        option("--loss", help="Long-tail loss of the outer minimisation: ce, focal, cb, ldam, bsl. [bsl]"),
        option("--model", help="resnet18, preact-resnet18, wrn-28-10, wrn-34-10, small-cnn. [resnet18]"),
        option("--epochs", type=int, help="Training epochs. [80]"),
        option("--batch-size", type=int, help="Batch size. [128]"),
        option("--lr", type=float, help="SGD learning rate. [0.1]"),
        option("--milestones", callback=_milestones, help="Epochs where the LR is multiplied by --lr-gamma. [60,75]"),
        option("--lr-gamma", type=float, help="LR decay factor at each milestone. [0.1]"),
        option("--weight-decay", type=float, help="SGD weight decay. [5e-4]"),
        option("--eps", type=float, help="L-inf radius of the training attack, in [0,1] units. [dataset default, 8/255]"),
        option("--step-size", type=float, help="Attack step size. [eps / 4]"),
        option("--attack-steps", type=int, help="PGD steps of the training attack. [method default: 10, RoBal 5]"),
        option("--eval-attack-steps", type=int, help="PGD steps for validation and the final test. [20]"),
        option("--rbl", help="REAT attack re-balancing: reference (released code: true-label weighted CE; "
               "cannot move the adversarial examples), logit (CE(z + log w): pushes them to rarely "
               "predicted classes), rw, rws, enr, brw, none. [reference]"),
        option("--tail", help="REAT feature regulariser: reference (released code's value and gradient), "
               "paper (Eq. 3), none. [reference]"),
        option("--tail-weight", type=float, help="Weight lambda of the TAIL term. [1.0]"),
        option("--class-groups", help="Head/body/tail rule: reference (released code) or paper. [reference]"),
        option("--robal-m", type=float, help="RoBal margin m. [0.1; 0.2 for 100 classes]"),
        option("--robal-s", type=float, help="RoBal logit scale s of the loss and of inference. [10]"),
        option("--robal-tau-b", type=float, help="RoBal training prior shift tau_b. [1.2; 0 for 100 classes]"),
        option("--robal-tau-m", type=float, help="RoBal class-aware margin tau_m. [0]"),
        option("--robal-beta", type=float, help="RoBal TRADES weight beta. [6; 3 for 100 classes]"),
        option("--robal-tau-p", type=float, help="RoBal inference prior shift tau_p. [0.1; 1.5 for 100 classes]"),
        option("--robal-gamma", type=float, help="RoBal cosine-classifier gamma (0.0625: CIFAR-100 'R'). [0.03125]"),
        option("--robal-margin-on", help="Logits of RoBal's margin loss: natural (TRADES form) or adversarial. "
               "[natural]"),
        option("--robal-lr-schedule", help="RoBal LR schedule: intended (--milestones) or released (the released "
               "code: x lr-gamma every epoch from the first milestone on). [intended]"),
        option("--augment", help="Extra per-image augmentation before crop/flip, any method: none, autoaugment "
               "(CIFAR-10 policy), randaugment (AT-BSL: --loss bsl --augment randaugment). [none]"),
        option("--sep-weight", type=float, help="SRAT: weight of the feature-separation (supervised contrastive) loss. [1.0]"),
        option("--sep-temperature", type=float, help="SRAT: temperature of the separation loss. [0.1]"),
        option("--drw-epoch", type=int, help="SRAT: first epoch (0-based) of deferred re-weighting (class-balanced "
               "weights, beta 0.9999). [first milestone]"),
        option("--drw-lr-factor", type=float, help="SRAT: LR factor applied at --drw-epoch, on top of the "
               "milestones. [1 if --drw-epoch is a milestone, else 0.1]"),
        option("--drw-reduction", help="SRAT: reduction of the re-weighted loss: weighted-mean (LDAM-DRW) or mean. "
               "[weighted-mean]"),
        option("--trades-beta", type=float, help="TRADES: weight beta of KL(nat || adv). [6]"),
        option("--mart-beta", type=float, help="MART: weight beta of the misclassification-aware KL. [6]"),
        option("--awp-gamma", type=float, help="AWP: per-layer weight perturbation relative to the weight norm. [5e-3]"),
        option("--awp-warmup", type=int, help="AWP: epochs without weight perturbation at the start. [0]"),
        option("--record-ae-distance", type=int, help="Mean L2 distance between the training-attack AEs of N fixed "
               "training images in consecutive epochs (metric ae_distance; the paper's Fig. 3). [0: off]"),
        option("--amp/--no-amp", default=None, help="bf16 autocast for the training forward and the training "
               "attack (losses in float32; validation and test in float32). CUDA and CPU. [off]"),
        option("--channels-last/--no-channels-last", default=None, help="Model and input batches in channels-last "
               "memory format (faster convolutions on GPUs). [off]"),
        option("--attack-chunk", type=int, help="Rows per forward/backward pass of the attacks' input gradient "
               "(speed only: the same AEs up to float rounding; eval-mode attacks). 0: the whole batch. "
               "[auto: 32 on the CPU, the whole batch on CUDA]"),
        option("--compile/--no-compile", default=None, help="torch.compile the forward pass of training and of the "
               "training attack (the first batches are slow while it compiles). [off]"),
        option("--seed", type=int, help="Seed of the LT subset, splits, init and augmentation. [0]"),
        option("--device", help="auto, cpu or cuda[:N]; under torchrun each process uses cuda:LOCAL_RANK (auto or "
               "cuda) or the CPU. [auto]"),
        option("--train-subset", type=int, help="Stratified subset of the training set (smoke runs)."),
        option("--eval-samples", type=int, help="Stratified test subset for the final report. [all]"),
        option("--val-fraction", type=float, help="Per-class held-out fraction for checkpoint selection. [0.05]"),
        option("--experiment", help="MLflow experiment name. [art-reat]"),
        option("--run-name", help="MLflow run name."),
        option("--tracking-uri", help="MLflow tracking URI. [sqlite:///./mlruns/mlflow.db]"),
        option("--output-dir", help="Folder for checkpoints (one sub-folder per run). [outputs]"),
        option("--keep-last", type=int, help="Also keep the N most recent per-epoch checkpoints epoch_XXX.pt "
               "(last.pt and best.pt are always kept). [0: none]"),
    ]

    def decorator(func: Callable) -> Callable:
        for add in reversed(options):
            func = add(func)
        return func

    return decorator

"""The typed run configuration: one dataclass, validated up front, saved with every run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from art_reat.errors import UsageError


@dataclass
class TrainConfig:
    # data
    dataset: str = "cifar10lt"
    ur: float = 100.0
    data_dir: str = "./data"
    download: bool = False
    train_subset: Optional[int] = None  # stratified subset of the LT training set, for smoke runs
    val_fraction: float = 0.05  # held out per class for checkpoint selection; 0 keeps the paper's protocol
    eval_samples: Optional[int] = None  # stratified test subset for the final report (None: whole test set)
    class_groups: str = "reference"  # head/body/tail rule: "reference" (released code) or "paper"
    # model and method
    model: str = "resnet18"
    method: str = "pgd-at"
    loss: str = "bsl"
    # optimisation (SPEC section 6)
    epochs: int = 80
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: List[int] = field(default_factory=lambda: [60, 75])
    lr_gamma: float = 0.1
    # threat model of the training attack; None means the dataset's default eps and eps / 4
    eps: Optional[float] = None
    step_size: Optional[float] = None
    attack_steps: Optional[int] = None  # None: the method's default (10; RoBal 5)
    eval_attack_steps: int = 20
    # REAT (SPEC sections 4-5); ignored by other methods
    rbl: str = "reference"
    tail: str = "reference"
    tail_weight: float = 1.0
    # RoBal (SPEC section 7); ignored by other methods. None: the dataset's value (chosen by the number
    # of classes: 100 -> CIFAR-100-LT's, otherwise CIFAR-10-LT's)
    robal_m: Optional[float] = None  # margin m (0.1; CIFAR-100: 0.2)
    robal_s: Optional[float] = None  # logit scale s of the loss and of inference (10)
    robal_tau_b: Optional[float] = None  # training prior shift tau_b (1.2; CIFAR-100: 0)
    robal_tau_m: Optional[float] = None  # class-aware margin tau_m (0)
    robal_beta: Optional[float] = None  # TRADES weight beta (6; CIFAR-100: 3)
    robal_tau_p: Optional[float] = None  # inference prior shift tau_p (0.1; CIFAR-100: 1.5)
    robal_gamma: Optional[float] = None  # cosine-classifier gamma (0.03125; CIFAR-100 "R" variant: 0.0625)
    robal_margin_on: str = "natural"  # logits of the margin loss: natural (TRADES form) or adversarial
    robal_lr_schedule: str = "intended"  # intended (milestones) or released (compounding decay after milestone 1)
    # baselines (issue 8); the method options are ignored by other methods
    augment: str = "none"  # per-sample policy before crop/flip, every method: none, autoaugment, randaugment
    sep_weight: float = 1.0  # SRAT: weight of the supervised-contrastive feature-separation loss
    sep_temperature: float = 0.1  # SRAT: temperature of the separation loss
    drw_epoch: Optional[int] = None  # SRAT: first (0-based) epoch of deferred re-weighting; None: first milestone
    drw_lr_factor: Optional[float] = None  # SRAT: LR factor at drw_epoch; None: 1 if it is a milestone, else 0.1
    drw_reduction: str = "weighted-mean"  # SRAT: weighted-mean (F.cross_entropy(weight=)) or mean (sum w l / B)
    trades_beta: float = 6.0  # TRADES: weight of KL(nat || adv)
    mart_beta: float = 6.0  # MART: weight of the (1 - p_y)-weighted KL term
    awp_gamma: float = 5e-3  # AWP: per-layer weight perturbation, relative to the weights' norm
    awp_warmup: int = 0  # AWP: epochs without weight perturbation at the start
    # reporting (issue 5)
    record_ae_distance: int = 0  # probe images whose training AEs are compared across epochs (Fig. 3); 0: off
    # speed (issue 6): they change how fast, not what is trained (amp: bf16 rounding of the forward passes)
    amp: bool = False  # bf16 autocast around the training forward and the training attack's forward passes
    channels_last: bool = False  # model and input batches in torch.channels_last
    # rows per input-gradient pass of the attacks in eval mode (same AEs up to float rounding); None: auto
    # (32 on the CPU, where it is about 1.45x faster for ResNet-18, the whole batch on CUDA); 0: whole batch
    attack_chunk: Optional[int] = None
    compile: bool = False  # torch.compile of the forward pass used for training and the training attack
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    experiment: str = "art-reat"
    run_name: Optional[str] = None
    tracking_uri: Optional[str] = None
    output_dir: str = "outputs"
    # reliability (checkpoints; `art-reat train --resume` may change it)
    keep_last: int = 0  # also keep the N most recent per-epoch checkpoints epoch_XXX.pt (last/best always)

    def validate(self) -> "TrainConfig":
        """Raise a one-line UsageError for the first bad value; return self."""
        _check(self.ur >= 1 and math.isfinite(self.ur), "ur", self.ur, "a number >= 1")
        _check(self.keep_last >= 0, "keep_last", self.keep_last, "an integer >= 0")
        _check(self.attack_chunk is None or self.attack_chunk >= 0, "attack_chunk", self.attack_chunk,
               "an integer >= 0 (0: the whole batch)")
        _check(self.record_ae_distance >= 0, "record_ae_distance", self.record_ae_distance, "an integer >= 0")
        for name in ("eps", "step_size"):
            value = getattr(self, name)
            _check(value is None or 0 < value <= 1, name, value, "a number in (0, 1] (inputs are in [0, 1])")
        for name in ("epochs", "batch_size", "attack_steps", "eval_attack_steps"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "an integer >= 1")
        _check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "a fraction in [0, 1)")
        for name in ("train_subset", "eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "a positive integer")
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(0 < self.lr_gamma <= 1, "lr_gamma", self.lr_gamma, "a number in (0, 1]")
        _check(all(m >= 1 for m in self.milestones), "milestones", self.milestones, "positive epochs")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "device", self.device, "auto, cpu or cuda[:N]")
        _check(self.class_groups in ("reference", "paper"), "class_groups", self.class_groups,
               "reference or paper")
        from art_reat.attacks.rebalanced import REBALANCE_SCHEMES

        _check(self.rbl in REBALANCE_SCHEMES, "rbl", self.rbl, "one of " + ", ".join(REBALANCE_SCHEMES))
        _check(self.tail in ("reference", "paper", "none"), "tail", self.tail, "reference, paper or none")
        _check(self.tail_weight >= 0, "tail_weight", self.tail_weight, "a number >= 0")
        for name in ("robal_m", "robal_tau_b", "robal_tau_m", "robal_beta", "robal_tau_p", "robal_gamma"):
            value = getattr(self, name)
            _check(value is None or (math.isfinite(value) and value >= 0), name, value, "a number >= 0")
        _check(self.robal_s is None or (math.isfinite(self.robal_s) and self.robal_s > 0), "robal_s", self.robal_s,
               "a number > 0")
        _check(self.robal_margin_on in ("natural", "adversarial"), "robal_margin_on", self.robal_margin_on,
               "natural or adversarial")
        _check(self.robal_lr_schedule in ("intended", "released"), "robal_lr_schedule", self.robal_lr_schedule,
               "intended or released")
        _validate_baselines(self)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown config key(s) {', '.join(unknown)}: allowed keys are {', '.join(sorted(known))}")
        hints = get_type_hints(cls)
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})


def read_config_file(path: str | Path) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a dict with dashes in keys turned into underscores."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as exc:  # any parser error is the user's file, not our bug
        raise UsageError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a value from a config file (or a saved run) to the field's type, or a one-line error."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in get_args(hint):
            return None
        raise UsageError(f"invalid {name.replace('_', '-')} None: a value is required")
    if get_origin(hint) is Union:  # Optional[X]
        return _coerce(name, value, args[0])
    if get_origin(hint) in (list, List):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return [_coerce(name, item, args[0]) for item in items]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
        raise UsageError(f"invalid {name.replace('_', '-')} {value!r}: must be {kind}") from None
    return value


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UsageError(f"invalid {name.replace('_', '-')} {value!r}: must be {allowed}")


def _validate_baselines(config: TrainConfig) -> None:
    """The options of the baselines of issue 8 (augmentation, SRAT, TRADES, MART, AWP)."""
    from art_reat.data.augment import AUGMENT_POLICIES
    from art_reat.losses.baselines import DRW_REDUCTIONS

    _check(config.augment in AUGMENT_POLICIES, "augment", config.augment, ", ".join(AUGMENT_POLICIES))
    _check(math.isfinite(config.sep_weight) and config.sep_weight >= 0, "sep_weight", config.sep_weight,
           "a number >= 0")
    _check(math.isfinite(config.sep_temperature) and config.sep_temperature > 0, "sep_temperature",
           config.sep_temperature, "a number > 0")
    _check(config.drw_epoch is None or config.drw_epoch >= 0, "drw_epoch", config.drw_epoch, "an integer >= 0")
    _check(config.drw_lr_factor is None or (math.isfinite(config.drw_lr_factor) and 0 < config.drw_lr_factor <= 1),
           "drw_lr_factor", config.drw_lr_factor, "a number in (0, 1]")
    _check(config.drw_reduction in DRW_REDUCTIONS, "drw_reduction", config.drw_reduction, " or ".join(DRW_REDUCTIONS))
    for name in ("trades_beta", "mart_beta", "awp_gamma"):
        value = getattr(config, name)
        _check(math.isfinite(value) and value >= 0, name, value, "a number >= 0")
    _check(config.awp_warmup >= 0, "awp_warmup", config.awp_warmup, "an integer >= 0")

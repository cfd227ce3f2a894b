"""Adversarial trainers and the registry of training methods.

`METHODS` maps a method name to a builder `build(config, parts, **common) -> trainer`. `parts`
(`MethodParts`) holds the model, long-tail loss, optimiser, class counts and device; the builder
wraps them in the ART classifier its method needs. `common` holds what every trainer takes
(scheduler, checkpoint_dir, callbacks, ...). A new method is one module plus one builder here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from art_reat.estimators import LongTailClassifier, TAILPyTorchClassifier
from art_reat.registry import Registry
from art_reat.trainers.pgd_at import PGDATTrainer, save_atomic
from art_reat.trainers.reat import REATTrainer

METHODS: Registry = Registry("method")
# Methods that change the architecture (e.g. RoBal's cosine head) register a hook here; it runs
# before the optimiser is built in training, and before the weights are loaded in evaluation.
MODEL_PREPARERS: Dict[str, Callable] = {}


def prepare_model(config, model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    hook = MODEL_PREPARERS.get(config.method)
    return model if hook is None else hook(config, model, num_classes)


@dataclass
class MethodParts:
    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    num_classes: int
    train_counts: np.ndarray
    input_shape: Tuple[int, ...]
    device: torch.device

    def classifier(self, cls=LongTailClassifier, **kwargs):
        return cls(self.model, self.loss, self.num_classes, input_shape=self.input_shape,
                   optimizer=self.optimizer, device=self.device, **kwargs)


# Steps of the training attack when the config leaves them unset (None).
DEFAULT_ATTACK_STEPS: Dict[str, int] = {"robal": 5}


def default_attack_steps(method: str) -> int:
    return DEFAULT_ATTACK_STEPS.get(method, 10)


def _attack_settings(config) -> dict:
    steps = config.attack_steps if config.attack_steps is not None else default_attack_steps(config.method)
    return dict(nb_epochs=config.epochs, batch_size=config.batch_size, eps=config.eps, eps_step=config.step_size,
                max_iter=steps, eval_attack_steps=config.eval_attack_steps, attack_chunk=config.attack_chunk)


@METHODS.register("pgd-at")
def build_pgd_at(config, parts: MethodParts, **common) -> PGDATTrainer:
    return PGDATTrainer(parts.classifier(), **_attack_settings(config), **common)


@METHODS.register("reat")
def build_reat(config, parts: MethodParts, **common) -> REATTrainer:
    if config.tail == "none":
        classifier = parts.classifier()
    else:
        from art_reat.data import class_groups

        classifier = parts.classifier(TAILPyTorchClassifier, train_counts=parts.train_counts,
                                      tail_mode=config.tail, tail_weight=config.tail_weight,
                                      tail_classes=class_groups(parts.num_classes, config.class_groups)["tail"])
    return REATTrainer(classifier, train_counts=parts.train_counts, rebalance=config.rbl,
                       **_attack_settings(config), **common)


# RoBal (SPEC section 7): cosine head (prepared before the optimiser is built), TRADES-form loss.
from art_reat.trainers.robal import RoBalTrainer, prepare_robal_model, robal_parts, robal_settings  # noqa: E402

MODEL_PREPARERS["robal"] = prepare_robal_model


@METHODS.register("robal")
def build_robal(config, parts: MethodParts, **common) -> RoBalTrainer:
    parts, common = robal_parts(config, parts, common)
    settings = robal_settings(config, parts.num_classes)
    settings.pop("gamma")  # a property of the head, set when the head is built
    return RoBalTrainer(parts.classifier(), train_counts=parts.train_counts,
                        margin_on=getattr(config, "robal_margin_on", "natural"), **settings,
                        **_attack_settings(config), **common)


# Baselines of issue 8: SRAT (SPEC section 8), TRADES, MART, AWP; each takes the configured long-tail loss.
from art_reat.trainers.awp import AWPTrainer  # noqa: E402
from art_reat.trainers.mart import MARTTrainer  # noqa: E402
from art_reat.trainers.srat import SRAT_LOSSES, SRATTrainer, srat_settings  # noqa: E402
from art_reat.trainers.trades import TRADESTrainer  # noqa: E402


@METHODS.register("srat")
def build_srat(config, parts: MethodParts, **common) -> SRATTrainer:
    if config.loss not in SRAT_LOSSES:
        from art_reat.errors import UsageError

        raise UsageError(f"method srat takes --loss {', '.join(SRAT_LOSSES)} (got {config.loss!r}); deferred "
                         f"re-weighting supplies the class weights")
    return SRATTrainer(parts.classifier(), train_counts=parts.train_counts, **srat_settings(config),
                       **_attack_settings(config), **common)


@METHODS.register("trades")
def build_trades(config, parts: MethodParts, **common) -> TRADESTrainer:
    return TRADESTrainer(parts.classifier(), beta=config.trades_beta, **_attack_settings(config), **common)


@METHODS.register("mart")
def build_mart(config, parts: MethodParts, **common) -> MARTTrainer:
    return MARTTrainer(parts.classifier(), beta=config.mart_beta, **_attack_settings(config), **common)


@METHODS.register("awp")
def build_awp(config, parts: MethodParts, **common) -> AWPTrainer:
    return AWPTrainer(parts.classifier(), gamma=config.awp_gamma, warmup=config.awp_warmup,
                      **_attack_settings(config), **common)


__all__ = ["METHODS", "MODEL_PREPARERS", "MethodParts", "default_attack_steps", "prepare_model", "PGDATTrainer", "REATTrainer", "save_atomic",
           "RoBalTrainer", "build_robal",
           "AWPTrainer", "MARTTrainer", "SRATTrainer", "TRADESTrainer"]

"""Loss family: long-tailed recognition losses (SPEC section 3) behind one registry.

``build_loss(name, train_counts, **kwargs)`` builds a registered loss module; every
module is called as ``loss(logits, labels) -> scalar``. Names: ce, focal, cb (the
paper's "EN"), ldam, bsl.
"""

from __future__ import annotations

import inspect

from torch import nn

from art_reat.errors import UsageError
from art_reat.registry import Registry

LOSSES: Registry = Registry("loss")


def build_loss(name: str, train_counts, **kwargs) -> nn.Module:
    """Build loss ``name`` for per-class training counts ``train_counts`` (N_c).

    ``kwargs`` are the loss's options (e.g. ``weight``, ``gamma``, ``beta``,
    ``max_m``, ``s``); an unknown name or option is a one-line UsageError.
    """
    cls = LOSSES.get(name)
    try:
        inspect.signature(cls).bind(train_counts, **kwargs)
    except TypeError as exc:
        raise UsageError(f"loss '{name}': {exc}") from None
    return cls(train_counts, **kwargs)


from art_reat.losses.longtail import (  # noqa: E402  (modules register themselves into LOSSES)
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LongTailLoss,
    balanced_softmax_loss,
    class_balanced_weights,
    ldam_margins,
    validate_counts,
)
from art_reat.losses.reat import (  # noqa: E402  (REAT building blocks, SPEC sections 4-5)
    ATTACK_WEIGHT_SCHEMES,
    TAIL_MODES,
    attack_class_weights,
    brw_logit_shift,
    rbl_class_weights,
    tail_class_weights,
    tail_regularizer,
    tail_regularizer_core,
)
from art_reat.losses.robal import RoBalMarginLoss, robal_class_margins, robal_margin_loss, trades_kl  # noqa: E402,F401
from art_reat.losses.baselines import DRW_REDUCTIONS, drw_reduce, mart_terms, supcon_separation_loss  # noqa: E402,F401

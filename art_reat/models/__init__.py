"""Model zoo: CIFAR ResNets, WideResNets and a small CPU-friendly CNN, built by name."""

from __future__ import annotations

import inspect
import numbers
from typing import Callable

from art_reat.errors import UsageError
from art_reat.models.base import FeatureModel
from art_reat.registry import Registry

MODELS: Registry[Callable[..., FeatureModel]] = Registry("model")

# Imported after MODELS exists so each architecture module can register itself.
from art_reat.models import resnet, small_cnn, wideresnet  # noqa: E402,F401


def build_model(name: str, num_classes: int, **kwargs) -> FeatureModel:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    ``kwargs`` go to the builder (``in_channels``, ``normalization`` and
    architecture options such as ``width`` or ``dropout``).
    """
    builder = MODELS.get(name)
    # numbers.Integral also accepts numpy integers coming from dataset statistics.
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 2:
        raise UsageError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    try:
        inspect.signature(builder).bind(num_classes, **kwargs)
    except TypeError as err:
        raise UsageError(f"bad options for model '{name}': {err}") from None
    return builder(num_classes, **kwargs)


__all__ = ["MODELS", "FeatureModel", "build_model"]
from art_reat.models.cosine import CosineClassifier, attach_cosine_head  # noqa: E402  (RoBal, SPEC section 7)
__all__ += ["CosineClassifier", "attach_cosine_head"]

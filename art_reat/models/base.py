"""Common base class: every model exposes penultimate features and a replaceable head."""

from __future__ import annotations

import abc
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from art_reat.errors import UsageError

Normalization = Optional[Tuple[Sequence[float], Sequence[float]]]


class FeatureModel(nn.Module, abc.ABC):
    """Image classifier split into ``embed`` (features after global pooling) and ``head``.

    Inputs are NCHW images in [0, 1]; the optional per-channel ``normalization``
    is applied inside the model so attacks and epsilons stay in pixel space.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        in_channels: int = 3,
        normalization: Normalization = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise UsageError(f"num_classes must be >= 2, got {num_classes}")
        self.feature_dim = int(feature_dim)
        self.in_channels = int(in_channels)
        self._num_classes = int(num_classes)
        mean, std = _check_normalization(normalization, in_channels)
        # Always registered (identity by default) so every checkpoint has the same keys
        # and carries the normalisation the weights were trained with.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.head: nn.Module = nn.Linear(self.feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        """Number of logits; follows the head if it has been replaced."""
        for attr in ("out_features", "num_classes"):
            value = getattr(self.head, attr, None)
            if isinstance(value, int):
                return value
        return self._num_classes

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to the network's input space (subclasses call it first in ``embed``)."""
        return (x - self.mean) / self.std

    @abc.abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` after global average pooling."""

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features, logits)`` from one pass."""
        features = self.embed(x)
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


def _check_normalization(
    normalization: Normalization, in_channels: int
) -> Tuple[list, list]:
    if normalization is None:
        return [0.0] * in_channels, [1.0] * in_channels
    try:
        mean, std = normalization
        mean, std = [float(m) for m in mean], [float(s) for s in std]
    except (TypeError, ValueError):
        raise UsageError(
            f"normalization must be (mean, std) tuples of floats, got {normalization!r}"
        ) from None
    if len(mean) != in_channels or len(std) != in_channels:
        raise UsageError(
            f"normalization needs {in_channels} means and stds, got {len(mean)} and {len(std)}"
        )
    if min(std) <= 0:
        raise UsageError(f"normalization std must be positive, got {std}")
    return mean, std

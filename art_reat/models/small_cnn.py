"""A small CNN for fast CPU tests and smoke runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from art_reat.errors import UsageError
from art_reat.models import MODELS
from art_reat.models.base import FeatureModel, Normalization


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SmallCNN(FeatureModel):
    """conv(32w)-conv(64w)-pool-conv(128w)-pool-GAP, BatchNorm after each conv; 128w-d features."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        normalization: Normalization = None,
        width: float = 1.0,
    ) -> None:
        if width <= 0:
            raise UsageError(f"small-cnn width must be positive, got {width}")
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        super().__init__(c3, num_classes, in_channels, normalization)
        self.features = nn.Sequential(
            _conv_bn(in_channels, c1),
            _conv_bn(c1, c2),
            nn.MaxPool2d(2),
            _conv_bn(c2, c3),
            nn.MaxPool2d(2),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.normalize(x))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@MODELS.register("small-cnn")
def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    normalization: Normalization = None,
    width: float = 1.0,
) -> SmallCNN:
    """Small CNN (about 94k parameters at ``width=1``)."""
    return SmallCNN(num_classes, in_channels, normalization, width)

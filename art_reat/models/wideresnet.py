"""WideResNet-28-10 / 34-10 in the TRADES / RoBal layout (640-d features, dropout off)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from art_reat.errors import UsageError
from art_reat.models import MODELS
from art_reat.models.base import FeatureModel, Normalization


class WideBlock(nn.Module):
    """Pre-activation wide block; a projecting shortcut taps the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


class WideResNet(FeatureModel):
    """WRN-depth-widen: 16-channel stem, three stages of 16k/32k/64k channels, BN-ReLU, GAP."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int = 3,
        normalization: Normalization = None,
        dropout: float = 0.0,
    ) -> None:
        if (depth - 4) % 6 != 0:
            raise UsageError(f"WideResNet depth must be 6n+4, got {depth}")
        widths = (16 * widen, 32 * widen, 64 * widen)
        super().__init__(widths[-1], num_classes, in_channels, normalization)
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks = []
        cin = 16
        for i, width in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(cin, width, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        # TRADES initialisation: He-normal (fan_out) convs, zero-bias classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@MODELS.register("wrn-28-10")
def wrn_28_10(
    num_classes: int,
    in_channels: int = 3,
    normalization: Normalization = None,
    dropout: float = 0.0,
) -> WideResNet:
    """WideResNet-28-10 (36,479,194 parameters for 10 classes)."""
    return WideResNet(28, 10, num_classes, in_channels, normalization, dropout)


@MODELS.register("wrn-34-10")
def wrn_34_10(
    num_classes: int,
    in_channels: int = 3,
    normalization: Normalization = None,
    dropout: float = 0.0,
) -> WideResNet:
    """WideResNet-34-10, RoBal's backbone (46,160,474 parameters for 10 classes)."""
    return WideResNet(34, 10, num_classes, in_channels, normalization, dropout)

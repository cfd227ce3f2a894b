"""CIFAR ResNet-18 and PreAct ResNet-18 (3x3 stem, no max-pool, 512-d features)."""

from __future__ import annotations

from typing import List, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from art_reat.models import MODELS
from art_reat.models.base import FeatureModel, Normalization


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation block; projection shortcut (1x1 conv + BN) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016); projection shortcut is a bare 1x1 conv."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The shortcut branches off the activated input when it projects.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(FeatureModel):
    """CIFAR-style ResNet: 3x3 stem conv, four stages of 64/128/256/512 channels, GAP."""

    def __init__(
        self,
        block: Type[Union[BasicBlock, PreActBlock]],
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        normalization: Normalization = None,
        final_bn: bool = False,
    ) -> None:
        super().__init__(512, num_classes, in_channels, normalization)
        self.preact = block is PreActBlock
        self.conv1 = _conv3x3(in_channels, 64)
        # Pre-activation nets start with a bare conv: the first block normalises.
        self.bn1: nn.Module = nn.Identity() if self.preact else nn.BatchNorm2d(64)
        layers: List[nn.Module] = []
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*layers)
        # Optional final BN-ReLU for pre-activation nets (Rice et al. / RobustBench layout).
        self.final_bn: nn.Module | None = nn.BatchNorm2d(512) if final_bn else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.final_bn is not None:
            out = F.relu(self.final_bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@MODELS.register("resnet18")
def resnet18(
    num_classes: int, in_channels: int = 3, normalization: Normalization = None
) -> ResNet:
    """CIFAR ResNet-18 (11,173,962 parameters for 10 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, normalization)


@MODELS.register("preact-resnet18")
def preact_resnet18(
    num_classes: int,
    in_channels: int = 3,
    normalization: Normalization = None,
    final_bn: bool = False,
) -> ResNet:
    """PreAct ResNet-18 (11,171,146 parameters for 10 classes; ``final_bn`` adds a BN-ReLU
    before pooling as in Rice et al. 2020, 11,172,170 parameters)."""
    return ResNet(
        PreActBlock, (2, 2, 2, 2), num_classes, in_channels, normalization, final_bn
    )

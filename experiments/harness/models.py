"""The parents of the MNIST experiments: the paper's MLPNet and a small BatchNorm ResNet, with their training
settings (``Arch``) and widths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hf_otfusion.testing import BasicBlock, MLPNet


class MnistResNet(nn.Module):
    """A small ResNet for 1x28x28 digits: 3x3 stem, three basic blocks (width, 2x, 4x; strides 1, 2, 2), BatchNorm."""

    def __init__(self, width: int = 8, num_classes: int = 10, use_norm: bool = True):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=not use_norm),
                                  nn.BatchNorm2d(w) if use_norm else nn.Identity(), nn.ReLU())
        self.layer1 = BasicBlock(w, w, 1, use_norm)
        self.layer2 = BasicBlock(w, 2 * w, 2, use_norm)
        self.layer3 = BasicBlock(2 * w, 4 * w, 2, use_norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class Arch:
    name: str
    label: str
    build: Callable[[object], nn.Module]
    narrow: object  # the default width
    widths: tuple  # widths experiment: different widths, fused into the first (the narrowest)
    wide: object  # compression: the wide model
    small: object  # compression: the narrow target
    epochs: int
    lr: float
    has_bn: bool

    def describe(self, width: object) -> str:
        if self.name == "mlp":
            return "784-" + "-".join(str(h) for h in width) + "-10"
        return f"width {width} ({width}-{2 * width}-{4 * width} channels)"


ARCHS = {
    "mlp": Arch("mlp", "MLPNet (no norms)", lambda w: MLPNet(tuple(w)), (400, 200, 100),
                ((400, 200, 100), (600, 300, 150), (800, 400, 200)), (800, 400, 200), (200, 100, 50),
                epochs=10, lr=0.05, has_bn=False),
    "resnet": Arch("resnet", "ResNet (BatchNorm)", lambda w: MnistResNet(int(w)), 8, (8, 12, 16), 16, 8,
                   epochs=3, lr=0.05, has_bn=True),
}

"""Tiny model definitions shared by the scripts (not part of the package).

- ``MLPNet``: the paper's MNIST MLP, 784-400-200-100-10 with ReLU and biases (widths configurable).
- ``vgg``: CIFAR-style VGG (3x32x32 inputs), e.g. VGG11, with or without BatchNorm.
- ``cifar_resnet18`` / ``cifar_resnet50``: CIFAR-style ResNets (3x3 stem, no max-pool), basic or
  bottleneck blocks, projection shortcuts, BatchNorm or no norm at all.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class MLPNet(nn.Module):
    """Flatten, then Linear+ReLU for each hidden width, then a Linear classifier."""

    def __init__(self, hidden: Sequence[int] = (400, 200, 100), in_features: int = 784, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg_tiny": [16, "M", 32, "M", 64, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG: conv3x3 (+BN) + ReLU blocks with max-pools, then flatten and one Linear."""

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        batch_norm: bool = False,
        in_ch: int = 3,
        bias: bool = True,
        in_size: int = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        ch, size = in_ch, in_size
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            layers.append(nn.Conv2d(ch, int(item), 3, padding=1, bias=bias and not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item)))
            layers.append(nn.ReLU())
            ch = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch * size * size, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(name: str = "vgg11", batch_norm: bool = False, num_classes: int = 10, bias: bool = True) -> VGG:
    """A CIFAR-style VGG from ``VGG_CFGS`` (3x32x32 inputs)."""
    return VGG(VGG_CFGS[name], num_classes=num_classes, batch_norm=batch_norm, bias=bias)


def _norm(channels: int, use_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_norm else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int, use_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=not use_norm)
        self.bn1 = _norm(ch, use_norm)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=not use_norm)
        self.bn2 = _norm(ch, use_norm)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=not use_norm), _norm(ch, use_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int, use_norm: bool):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=not use_norm)
        self.bn1 = _norm(ch, use_norm)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=not use_norm)
        self.bn2 = _norm(ch, use_norm)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=not use_norm)
        self.bn3 = _norm(out_ch, use_norm)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=not use_norm), _norm(out_ch, use_norm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), four stages, global average pool, Linear."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 10,
        use_norm: bool = True,
        width: int = 64,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=not use_norm)
        self.bn1 = _norm(width, use_norm)
        self.relu = nn.ReLU()
        in_ch = width
        stages = []
        for i, n in enumerate(layers):
            ch = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, ch, stride, use_norm))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet18(use_norm: bool = True, num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet18 for 3x32x32 inputs (basic blocks 2-2-2-2); ``use_norm=False`` drops every BatchNorm."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, use_norm, width)


def cifar_resnet50(use_norm: bool = True, num_classes: int = 10, width: int = 64) -> CifarResNet:
    """ResNet50 for 3x32x32 inputs (bottleneck blocks 3-4-6-3)."""
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes, use_norm, width)


def seeded(factory, seed: int, *args, **kwargs) -> nn.Module:
    """Build ``factory(*args, **kwargs)`` with ``torch.manual_seed(seed)`` set first."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs)


def mean_std(values: Sequence[float]) -> str:
    """'mean ± std' in percent (sample std; 0 for one value)."""
    pct = [100 * v for v in values]
    std = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.fmean(pct):.2f} ± {std:.2f}"


def gap_table(gaps: Sequence[tuple[str, Sequence[float]]]) -> list[str]:
    """Markdown rows: each named per-pair difference (fractions) as 'mean ± std' and its worst pair, in points."""
    out = ["", "| difference (points) | mean ± std | worst pair |", "|---|---:|---:|"]
    return out + [f"| {name} | {mean_std(values)} | {100 * min(values):+.2f} |" for name, values in gaps]


def finish_report(out: list[str], fuse_times: dict[str, list[float]], elapsed: float, path: Path | None) -> str:
    """Add the timing line to a report's lines, print the report and write it to ``path`` when given."""
    out += [
        "",
        f"Fusion time per pair (s): weights {statistics.fmean(fuse_times['weights']):.2f}, "
        f"activations {statistics.fmean(fuse_times['activations']):.2f}; whole run {elapsed:.0f} s "
        f"on {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}.",
    ]
    report = "\n".join(out)
    print(report)
    if path is not None:
        path.write_text(report + "\n")
    return report

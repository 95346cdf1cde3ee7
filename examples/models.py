"""Real architectures to try bn-diff on (no torchvision needed), and their factories for --arch.

- `forum_net()`: the forum case from DESIGN.md — Conv2d(3, 2) -> BatchNorm2d(2) with weight
  [0.8352, 0.2056] and bias [0, 0], left in train mode (as every module is after construction).
- `small_cnn()`: a small CNN in eval mode; `make_examples.py` calibrates its running statistics.
- `resnet50_style()`: bottleneck blocks [3, 4, 6, 3], 53 BatchNorm2d (as torchvision's ResNet-50).
- `mobilenet_style()`: inverted residuals with depthwise convs and ReLU6 (MobileNetV2-like).
- `mlp_bn1d()`: an MLP with BatchNorm1d.
- `calibrate(model, shape)`: a few train-mode batches of synthetic data, so running statistics are
  realistic (not 0/1), then eval().
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def forum_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 2, kernel_size=3, padding=1), bn=nn.BatchNorm2d(2))
    )
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([0.8352, 0.2056]))
        net.bn.bias.zero_()
    return net  # train mode: the default after construction


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


def small_cnn() -> nn.Module:
    """Factory for --arch: built in eval mode, as a deployed model would be."""
    return SmallCNN().eval()


# --- ResNet-50 style ----------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNetStyle(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        stages = []
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layers = []
            for j in range(n):
                layers.append(Bottleneck(inplanes, planes, stride=2 if (j == 0 and i > 0) else 1))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        # four named stages, as torchvision's ResNet (and TorchScript-friendly)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def resnet50_style() -> nn.Module:
    return ResNetStyle().eval()


def resnet_tiny() -> nn.Module:
    """Same structure, fewer and narrower blocks: quick for tests."""
    return ResNetStyle(blocks=(1, 1, 1, 1), width=8, num_classes=10).eval()


# --- MobileNetV2 style --------------------------------------------------------------------------
def _conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res else y


class MobileNetStyle(nn.Module):
    # (expand, out channels, repeats, stride) as in MobileNetV2
    CFG = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self, num_classes: int = 1000, cfg: tuple[tuple[int, int, int, int], ...] | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in cfg or self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def mobilenet_style() -> nn.Module:
    return MobileNetStyle().eval()


def mobilenet_tiny() -> nn.Module:
    return MobileNetStyle(num_classes=10, cfg=((1, 8, 1, 1), (2, 16, 2, 2))).eval()


# --- BatchNorm1d MLP ----------------------------------------------------------------------------
def mlp_bn1d(features: int = 20, hidden: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 2),
    ).eval()


@torch.no_grad()
def calibrate(
    model: nn.Module, shape: tuple[int, ...], batches: int = 4, seed: int = 0
) -> nn.Module:
    """Give BN layers realistic running statistics: a few train-mode batches, then eval()."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(batches):
        model(torch.randn(shape, generator=g) * 1.5 + 0.2)
    return model.eval()

"""Pre-activation ResNets for CIFAR (He et al. 2016), as in the SWA code.

Depth ``d``: basic blocks with ``n = (d-2)/6`` blocks per stage for ``d < 44``
(PreResNet8, 20), bottleneck blocks with ``n = (d-2)/9`` for ``d >= 44``
(PreResNet56, 110).  Three stages of widths 16, 32, 64 (x4 for bottlenecks),
the last two with stride 2, then BN-ReLU, global average pooling and a linear
layer.  The pooling is adaptive (equal to the original 8x8 average pool on
32x32 inputs), so the models also run on 8x8 digits.

>>> import torch
>>> net = PreResNet(8, num_classes=10, in_channels=1)
>>> net(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from nets.models._common import check_image_input, check_positive_int
from nets.models._init import he_normal_conv, materialise
from spectral.errors import argument_error

__all__ = ["PreResNet"]


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class PreResNet(nn.Module):
    """Pre-activation ResNet of depth 8, 20, 56, 110 (any ``6n+2`` < 44 or ``9n+2`` >= 44).

    Parameters
    ----------
    depth : int
        Number of layers (8, 20, 56, 110...).
    num_classes, in_channels, input_size : int
        Output classes, input channels and input side length.
    seed : int
        Initialisation seed (torch's global generator is not used).

    Raises
    ------
    ValueError
        For a depth that is not of that form.

    Examples
    --------
    >>> import torch
    >>> net = PreResNet(8, num_classes=10)
    >>> sum(p.numel() for p in net.parameters()), net(torch.zeros(2, 3, 32, 32)).shape
    (77850, torch.Size([2, 10]))
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        check_positive_int("num_classes", num_classes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size, minimum=4)
        block: type[_BasicBlock] | type[_Bottleneck]
        if depth >= 44 and (depth - 2) % 9 == 0:
            block, n = _Bottleneck, (depth - 2) // 9
        elif depth < 44 and depth >= 8 and (depth - 2) % 6 == 0:
            block, n = _BasicBlock, (depth - 2) // 6
        else:
            raise argument_error(
                "depth", "6n+2 (< 44, basic blocks) or 9n+2 (>= 44, bottlenecks)", depth
            )
        self.depth = depth
        self._inplanes = 16
        with torch.device("meta"):
            self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
            self.layer1 = self._make_layer(block, 16, n, 1)
            self.layer2 = self._make_layer(block, 32, n, 2)
            self.layer3 = self._make_layer(block, 64, n, 2)
            self.bn = nn.BatchNorm2d(64 * block.expansion)
            self.relu = nn.ReLU()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64 * block.expansion, num_classes)
        materialise(self, seed, conv_init=he_normal_conv)

    def _make_layer(
        self, block: type[_BasicBlock] | type[_Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride=stride, bias=False)
            )
        layers: list[nn.Module] = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        check_image_input(f"PreResNet{self.depth}", x, self.in_channels)
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn(out)))
        result: torch.Tensor = self.fc(out.flatten(1))
        return result

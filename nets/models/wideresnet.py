"""Wide residual networks (Zagoruyko & Komodakis 2016), as in the SWA code.

``WideResNet(depth, widen_factor)`` with ``n = (depth-4)/6`` pre-activation
blocks per stage of widths ``16k, 32k, 64k`` (biased 3x3 convolutions, optional
dropout between them); :class:`WideResNet28_10` is depth 28, width 10
(36,489,290 parameters for 10 classes: the SWA code's variant, whose biased
convolutions add 10,096 to the original 36,479,194).  Global average pooling is
adaptive, so the network runs on 8x8 as well as 32x32 inputs.  BatchNorm uses
PyTorch's default momentum.

>>> import torch
>>> net = WideResNet(10, 1, num_classes=10, in_channels=1)
>>> net(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nets.models._common import check_image_input, check_positive_int
from nets.models._init import materialise
from spectral.errors import argument_error

__all__ = ["WideResNet", "WideResNet28_10"]


def _xavier_conv(module: nn.Conv2d, generator: torch.Generator) -> None:
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(2.0), generator=generator)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class _WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.relu(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` must be ``6n+4``.

    Parameters
    ----------
    depth : int
        Number of layers, ``6n + 4``.
    widen_factor : int
        Width multiplier of the three stages.
    num_classes, in_channels, input_size : int
        Output classes, input channels and input side length.
    dropout : float
        Dropout probability inside the blocks.
    seed : int
        Initialisation seed (torch's global generator is not used).

    Raises
    ------
    ValueError
        If ``(depth - 4) % 6 != 0``.

    Examples
    --------
    >>> import torch
    >>> net = WideResNet(10, 1, num_classes=10)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        *,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        check_positive_int("widen_factor", widen_factor)
        check_positive_int("num_classes", num_classes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size, minimum=4)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise argument_error("depth", "6n+4 with n >= 1 (e.g. 28)", depth)
        if not 0.0 <= dropout < 1.0:
            raise argument_error("dropout", "a probability in [0, 1)", dropout)
        n = (depth - 4) // 6
        k = widen_factor
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.name = f"WideResNet{depth}_{k}"
        with torch.device("meta"):
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
            blocks: list[nn.Module] = []
            in_planes = widths[0]
            for stage, stride in zip((1, 2, 3), (1, 2, 2)):
                for i in range(n):
                    blocks.append(
                        _WideBasic(in_planes, widths[stage], dropout, stride if i == 0 else 1)
                    )
                    in_planes = widths[stage]
            self.blocks = nn.Sequential(*blocks)
            self.bn = nn.BatchNorm2d(widths[3])
            self.relu = nn.ReLU()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.linear = nn.Linear(widths[3], num_classes)
        materialise(self, seed, conv_init=_xavier_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        check_image_input(self.name, x, self.in_channels)
        out = self.avgpool(self.relu(self.bn(self.blocks(self.conv1(x)))))
        result: torch.Tensor = self.linear(out.flatten(1))
        return result


class WideResNet28_10(WideResNet):
    """WRN-28-10 (36.5M parameters for CIFAR-10).

    Parameters
    ----------
    num_classes, in_channels, input_size : int
        Output classes, input channels and input side length.
    dropout : float
        Dropout probability inside the blocks.
    seed : int
        Initialisation seed (torch's global generator is not used).

    Examples
    --------
    >>> net = WideResNet28_10(num_classes=10)
    >>> sum(p.numel() for p in net.parameters()) > 36_000_000
    True
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        *,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(28, 10, num_classes, in_channels, input_size, dropout=dropout, seed=seed)

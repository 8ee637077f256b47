"""A small CNN with BatchNorm for the digits demo (about two thousand parameters).

``conv3x3(C->c1)-BN-ReLU-MaxPool2 -> conv3x3(c1->c2)-BN-ReLU -> AdaptiveAvgPool(2)
-> Linear(4*c2, classes)``.  Works on any input of at least 2x2 (8x8 digits,
32x32 CIFAR); with the default widths (8, 16) and 10 classes on one channel it
has 1,946 parameters, small enough for exact dense curvature references.

>>> import torch
>>> net = SmallCNN(10, 1, 8)
>>> sum(p.numel() for p in net.parameters())
1946
>>> net(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from nets.models._common import check_image_input, check_positive_int
from nets.models._init import materialise

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Two convolutions with BatchNorm and a linear classifier.

    Parameters
    ----------
    num_classes, in_channels, input_size:
        Output classes, input channels and (informational) input size.
    widths:
        Channels of the two convolutions, default ``(8, 16)``.
    seed:
        Initialisation seed.

    Examples
    --------
    >>> import torch
    >>> net = SmallCNN(10, 1, 8)
    >>> net(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        *,
        widths: tuple[int, int] = (8, 16),
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size, minimum=2)
        c1, c2 = (check_positive_int("widths", int(w)) for w in widths)
        with torch.device("meta"):
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, c1, 3, padding=1),
                nn.BatchNorm2d(c1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(c1, c2, 3, padding=1),
                nn.BatchNorm2d(c2),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
            )
            self.classifier = nn.Linear(4 * c2, num_classes)
        materialise(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        check_image_input("SmallCNN", x, self.in_channels)
        out: torch.Tensor = self.classifier(self.features(x).flatten(1))
        return out

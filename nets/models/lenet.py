"""LeNet-5 (ReLU and max-pooling variant).

On 32x32 inputs it is the classic architecture (two unpadded 5x5 convolutions,
16x5x5 features, 120-84-classes classifier: 61,706 parameters for one input
channel and 10 classes).  On smaller inputs (e.g. 8x8 digits) both
convolutions are zero-padded ("same"), giving 16 x (s/4) x (s/4) features; the
input size must then be a multiple of 4.

>>> import torch
>>> LeNet5(10, 1, 32)(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 10])
>>> LeNet5(10, 1, 8)(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from nets.models._common import check_image_input, check_positive_int
from nets.models._init import materialise
from spectral.errors import argument_error

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 for ``input_size`` >= 32 (classic) or a multiple of 4 below 32 (padded).

    Parameters
    ----------
    num_classes, in_channels, input_size : int
        Output classes, input channels and input side length.
    seed : int
        Initialisation seed (torch's global generator is not used).

    Raises
    ------
    ValueError
        For input sizes below 32 that are not multiples of 4.

    Examples
    --------
    >>> import torch
    >>> LeNet5(10, 1, 8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, *, seed: int = 0
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.input_size = check_positive_int("input_size", input_size)
        if input_size >= 32:
            padding, side = 0, ((input_size - 4) // 2 - 4) // 2
        elif input_size % 4 == 0:
            padding, side = 2, input_size // 4
        else:
            raise argument_error(
                "input_size", "an input size >= 32 or a multiple of 4 for LeNet5", input_size
            )
        with torch.device("meta"):
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, 6, 5, padding=padding),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5, padding=padding),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Linear(16 * side * side, 120),
                nn.ReLU(),
                nn.Linear(120, 84),
                nn.ReLU(),
                nn.Linear(84, num_classes),
            )
        materialise(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, s, s)``."""
        check_image_input("LeNet5", x, self.in_channels, self.input_size)
        out: torch.Tensor = self.classifier(self.features(x).flatten(1))
        return out

"""The CIFAR VGG family of the stochastic-weight-averaging literature.

Convolutional stack of 3x3 convolutions (padding 1, optional BatchNorm, ReLU)
with five 2x2 max-pools, then the classifier
``Dropout-Linear(512,512)-ReLU-Dropout-Linear(512,512)-ReLU-Linear(512,classes)``.
Convolutions are initialised ``N(0, 2/(9 C_out))`` with zero bias.  The five
pools reduce 32x32 to 1x1, so **the VGGs need 32x32 inputs** (CIFAR); other
sizes raise a ``ValueError``.  VGG16 for CIFAR-100 has P = 15,291,300
parameters, as in the paper.

>>> net = VGG(11, num_classes=10)
>>> sum(p.numel() for p in net.parameters())
9750922
"""

from __future__ import annotations

import torch
from torch import nn

from nets.models._common import check_image_input, check_positive_int
from nets.models._init import he_normal_conv, materialise
from spectral.errors import argument_error

__all__ = ["VGG", "VGG_CONFIGS"]

# fmt: off
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# fmt: on


class VGG(nn.Module):
    """VGG ``depth`` in {11, 13, 16, 19}, with BatchNorm when ``batch_norm=True``.

    Parameters
    ----------
    depth:
        Number of weight layers.
    num_classes, in_channels, input_size:
        Output classes, input channels, input side (must be 32).
    batch_norm:
        Insert ``BatchNorm2d`` after every convolution.
    dropout:
        Dropout probability in the classifier (0.5 as in the SWA code).
    seed:
        Initialisation seed.

    Raises
    ------
    ValueError
        For an unknown depth or ``input_size != 32``.

    Examples
    --------
    >>> import torch
    >>> net = VGG(11, num_classes=10, batch_norm=True)
    >>> net.eval()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        *,
        batch_norm: bool = False,
        dropout: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise argument_error("depth", f"one of {sorted(VGG_CONFIGS)}", depth)
        check_positive_int("num_classes", num_classes)
        self.in_channels = check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size)
        if input_size != 32:
            raise argument_error(
                "input_size",
                "32 for VGG (its five 2x2 max-pools reduce 32x32 to 1x1; use SmallCNN, "
                "LeNet5, MLP or PreResNet for 8x8 digits)",
                input_size,
            )
        if not 0.0 <= dropout < 1.0:
            raise argument_error("dropout", "a probability in [0, 1)", dropout)
        self.depth = depth
        layers: list[nn.Module] = []
        with torch.device("meta"):
            channels = in_channels
            for item in VGG_CONFIGS[depth]:
                if item == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    continue
                assert isinstance(item, int)
                layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(item))
                layers.append(nn.ReLU())
                channels = item
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(512, 512),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(512, 512),
                nn.ReLU(),
                nn.Linear(512, num_classes),
            )
        materialise(self, seed, conv_init=he_normal_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 32, 32)``."""
        check_image_input(f"VGG{self.depth}", x, self.in_channels, 32)
        out: torch.Tensor = self.classifier(self.features(x).flatten(1))
        return out

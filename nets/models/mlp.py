"""Multi-layer perceptron on flattened inputs.

>>> import torch
>>> net = MLP(num_classes=10, in_channels=1, input_size=8, hidden=(32,))
>>> net(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
>>> sum(p.numel() for p in net.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nets.models._common import check_positive_int
from nets.models._init import materialise
from spectral.errors import argument_error

__all__ = ["MLP"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Fully connected network: ``F`` inputs, the ``hidden`` layers, ``num_classes`` outputs.

    The input is flattened to ``F = in_channels * input_size**2`` features, so it
    works on any input size (8x8 digits, 32x32 CIFAR).  Vector data of dimension
    ``d`` (the synthetic datasets) uses ``in_channels=d, input_size=1``.

    Parameters
    ----------
    num_classes, in_channels, input_size:
        Output dimension, input channels and spatial side length.
    hidden:
        Widths of the hidden layers (default ``(128, 128)``).
    activation:
        ``"relu"``, ``"tanh"`` or ``"gelu"``.
    seed:
        Seed of the initialisation (torch's global RNG is not used).

    Examples
    --------
    >>> import torch
    >>> net = MLP(10, 1, 8, hidden=(32,))   # the digits: 1 x 8 x 8 images
    >>> net(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        *,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size)
        if activation not in _ACTIVATIONS:
            raise argument_error("activation", f"one of {sorted(_ACTIVATIONS)}", activation)
        widths = [check_positive_int("hidden", int(h)) for h in hidden]
        self.in_features = in_channels * input_size * input_size
        layers: list[nn.Module] = []
        with torch.device("meta"):
            fan_in = self.in_features
            for width in widths:
                layers += [nn.Linear(fan_in, width), _ACTIVATIONS[activation]()]
                fan_in = width
            layers.append(nn.Linear(fan_in, num_classes))
            self.layers = nn.Sequential(*layers)
        materialise(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)`` for inputs ``(N, ...)`` with F features."""
        flat = x.flatten(1)
        if flat.shape[1] != self.in_features:
            raise argument_error(
                "x", f"inputs with {self.in_features} features per sample for MLP", x
            )
        out: torch.Tensor = self.layers(flat)
        return out

"""Stochastic weight averaging (Izmailov et al. 2018) on top of ``torch.optim.swa_utils``.

:class:`WeightAverager` keeps the running average of a model's parameters
(``AveragedModel``, equal weights), recomputes the BatchNorm statistics of the
averaged model with a pass over training data (``update_bn``), and round-trips
through ``state_dict`` so that a resumed run continues the same average.

>>> import torch
>>> net = torch.nn.Linear(1, 1, bias=False)
>>> avg = WeightAverager(net)
>>> with torch.no_grad():
...     _ = net.weight.fill_(1.0)
>>> avg.update(net)
>>> with torch.no_grad():
...     _ = net.weight.fill_(3.0)
>>> avg.update(net)
>>> avg.n_averaged, avg.module.weight.item()
(2, 2.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

__all__ = ["WeightAverager"]


class WeightAverager:
    """Equal-weight running average of a model's parameters.

    Parameters
    ----------
    model:
        The model being trained; a deep copy holds the average (on the same device).
    """

    def __init__(self, model: nn.Module) -> None:
        self.averaged = AveragedModel(model)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class as the trained model)."""
        module: nn.Module = self.averaged.module
        return module

    @property
    def n_averaged(self) -> int:
        """How many models have been averaged."""
        return int(self.averaged.n_averaged.item())

    def update(self, model: nn.Module) -> None:
        """Add ``model``'s current parameters to the average."""
        self.averaged.update_parameters(model)

    def recompute_bn(self, loader: Iterable[Any], device: torch.device | None = None) -> None:
        """Recompute BatchNorm running statistics of the average with one pass over ``loader``.

        Does nothing for models without BatchNorm.
        """
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.module.modules()):
            update_bn(loader, self.averaged, device=device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averaged parameters, buffers and ``n_averaged`` (tensors only)."""
        return dict(self.averaged.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        self.averaged.load_state_dict(state)

"""Stochastic weight averaging (Izmailov et al. 2018) on top of ``torch.optim.swa_utils``.

:class:`WeightAverager` keeps the running average of a model's parameters
(``AveragedModel``, equal weights), recomputes the BatchNorm statistics of the
averaged model with a pass over training data (exactly pooled over batches of any size:
:func:`nets.batchnorm_statistics.refresh_batchnorm`), and round-trips through
``state_dict`` so that a resumed run continues the same average.

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
from torch.optim.swa_utils import AveragedModel

from nets.batchnorm_statistics import batchnorm_modules, refresh_batchnorm

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
        """Recompute the BatchNorm running statistics of the average with one pass over
        ``loader`` (the model's inputs, batch by batch).

        As in the original SWA code (and :func:`torch.optim.swa_utils.update_bn`) the
        whole averaged network runs in train mode, dropout included, and its modes are
        put back afterwards; the statistics are the exact mean and unbiased variance of
        each BatchNorm module's inputs over the pass, whatever the batch sizes
        (:func:`nets.batchnorm_statistics.refresh_batchnorm`; ``update_bn`` weighted
        every batch equally and left out the spread of the batch means).  The pass
        draws its dropout masks from torch's global generator forked and seeded with
        the number of averaged models, so the caller's random streams are untouched:
        a run's weights do not depend on how often it evaluates the average.  Does
        nothing for models without BatchNorm.

        The batches are moved to the average's device and floating dtype (``device``
        is kept for the signature's sake: the average's own device is used).
        """
        module = self.module
        if not batchnorm_modules(module):
            return
        first = next(iter(module.parameters()))
        modes = {m: m.training for m in module.modules()}
        devices = [first.device] if first.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.n_averaged)
                module.train()
                refresh_batchnorm(module, loader)
        finally:
            for m, mode in modes.items():
                m.training = mode

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averaged parameters, buffers and ``n_averaged`` (tensors only)."""
        return dict(self.averaged.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        self.averaged.load_state_dict(state)

"""Module modes: a block in eval mode that gives every submodule its own mode back.

``model.train(was_training)``, the usual way back after an evaluation, puts every
submodule in the top module's mode: a mixed setting (a frozen BatchNorm in eval mode
inside a model in train mode, as in fine-tuning) is lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["evaluation_mode"]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each submodule's own mode back on exit.

    (See the module docstring for why not ``model.train(was_training)``.)

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout())
    >>> net[0].eval()
    Linear(in_features=1, out_features=1, bias=True)
    >>> with evaluation_mode(net):
    ...     net.training, net[1].training
    (False, False)
    >>> net.training, net[0].training, net[1].training
    (True, False, True)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag

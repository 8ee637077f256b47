"""The mean loss over a data set, with each batch weighted by the loss's own normaliser.

A mean-reduced loss divides a batch's summed terms :math:`S_b` by its normaliser
:math:`\\nu_b` (:func:`curvops.losses.batch_weight`: the number of samples, or of counted
targets for cross-entropy with ``ignore_index`` padding, ...).  The loss over all the data
is :math:`\\sum_b S_b / \\sum_b \\nu_b = \\sum_b \\nu_b L_b / \\sum_b \\nu_b`, which is what
:class:`LossMean` accumulates; weighting the batch means by their number of samples instead
would give padded language-modelling data the wrong loss and perplexity.  Losses with
``reduction="sum"`` are weighted by their number of samples (the mean summed loss of a
batch of that size), which depends on the batching: training and evaluation take only
mean losses (:func:`check_mean_loss`).
"""

from __future__ import annotations

from typing import Any

import torch

from curvops.losses import batch_weight, loss_reduction, loss_setting
from spectral.errors import argument_error

__all__ = ["MEAN_REDUCTIONS", "LossMean", "check_mean_loss", "loss_weight"]

#: The ``reduction`` settings of a mean loss (``"batchmean"``: ``nn.KLDivLoss``'s mean over
#: samples).
MEAN_REDUCTIONS = ("mean", "batchmean")


def check_mean_loss(loss_fn: Any) -> Any:
    """``loss_fn`` itself, if it is a loss instance with mean reduction.

    A loss's reduction is its ``reduction`` setting (a module attribute, a
    ``functools.partial`` keyword: :func:`curvops.losses.loss_setting`); a callable without
    one (a plain function) is taken as a mean loss, as documented.  A ``"sum"`` loss's
    reported mean depended on the batch size (a test loss of 225.6, 292.4 or 869.8 for
    batch sizes 100, 128 or 359) and a ``"none"`` loss is no scalar.

    Raises
    ------
    TypeError
        Naming ``loss_fn``: not callable, or a loss class instead of an instance.
    ValueError
        Naming ``loss_fn``: a ``reduction`` other than ``"mean"`` (or ``"batchmean"``).

    Examples
    --------
    >>> check_mean_loss(torch.nn.MSELoss(reduction="sum"))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'loss_fn': expected a loss with mean reduction (reduction='mean'...
    """
    if isinstance(loss_fn, type):
        raise argument_error(
            "loss_fn",
            f"a loss instance, e.g. {loss_fn.__name__}() (a class was given)",
            loss_fn,
            kind=TypeError,
        )
    if not callable(loss_fn):
        raise argument_error(
            "loss_fn", "a loss: a callable (outputs, targets) -> mean loss", loss_fn, kind=TypeError
        )
    reduction = loss_setting(loss_fn, "reduction", "mean")
    if reduction not in MEAN_REDUCTIONS:
        raise argument_error(
            "loss_fn",
            "a loss with mean reduction (reduction='mean': the reported losses are means over "
            "samples, which a 'sum' loss makes depend on the batch size)",
            f"{loss_fn!r} with reduction={reduction!r}",
        )
    return loss_fn


def loss_weight(loss_fn: Any, inputs: Any, targets: torch.Tensor, size: int) -> Any:
    """The weight of a batch's loss in the mean over data: the loss's normaliser.

    A 0-d tensor on the targets' device where the normaliser is counted there (no host
    synchronisation), else a float; the batch size ``size`` for ``reduction="sum"``.

    >>> import torch
    >>> from curvops.losses import sequence_cross_entropy
    >>> float(loss_weight(sequence_cross_entropy(), None, torch.tensor([[1, -100]]), 1))
    1.0
    """
    if loss_reduction(loss_fn) == "sum":
        return float(size)
    return batch_weight(loss_fn, inputs, targets, size, lazy=True)


class LossMean:
    """Accumulates :math:`\\sum_b \\nu_b L_b` and :math:`\\sum_b \\nu_b` in float64 on ``device``.

    >>> import torch
    >>> m = LossMean(torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    >>> int(m.add(torch.tensor(1.0), None, torch.tensor([0, -100]), 2))  # 1 counted target
    1
    >>> int(m.add(torch.tensor(4.0), None, torch.tensor([0, 1]), 2))
    2
    >>> m.value()
    3.0
    """

    def __init__(self, loss_fn: Any, device: torch.device) -> None:
        self.loss_fn = loss_fn
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.weight = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, inputs: Any, targets: torch.Tensor, size: int) -> Any:
        """Add a batch's mean loss; return its weight (a batch of weight 0 adds nothing)."""
        w = loss_weight(self.loss_fn, inputs, targets, size)
        w64 = torch.as_tensor(w, dtype=torch.float64, device=self.total.device)
        value = loss.detach().to(self.total.device, torch.float64) * w64
        self.total += torch.where(w64 > 0, value, torch.zeros_like(value))
        self.weight += w64
        return w

    def value(self) -> float:
        """The weighted mean loss (NaN when nothing was counted)."""
        weight = float(self.weight)
        return float(self.total) / weight if weight > 0 else float("nan")

r"""Exact BatchNorm running statistics over a pass of data (SWA, loss landscapes).

:func:`refresh_batchnorm` recomputes the running statistics of every BatchNorm module
that tracks them as the exact mean and unbiased variance of the module's inputs over one
pass of batches, each batch forwarded with the BatchNorm modules in train mode (a module
normalises a batch with that batch's own statistics, so later modules see the inputs of
a train-mode forward), as :func:`torch.optim.swa_utils.update_bn` and the original SWA
code's ``bn_update`` do.  What differs is the pooling: for a module whose inputs over
the pass are :math:`n = \sum_b n_b` values per channel (samples times positions) with
batch means :math:`\mu_b` and within-batch squared deviations :math:`M_b`
(:class:`PooledMoments`),

.. math::
    \mu = \frac{1}{n}\sum_b n_b\,\mu_b ,\qquad
    \sigma^2 = \frac{1}{n-1}\Bigl(\sum_b M_b + \sum_b n_b\,(\mu_b - \mu)^2\Bigr),

the mean and the unbiased variance (``running_var`` holds ``n/(n-1)`` times the biased
one) of all :math:`n` values.  torch's cumulative average (``momentum=None``) weights
every batch equally -- wrong for batches of unequal size: ``x = 0..9`` in batches of 8 and
2 gave a running mean of 6.0 for 4.5 -- and averages the within-batch variances, leaving
out the spread of the batch means (3.25 for 9.17 there).

>>> import torch
>>> bn = torch.nn.BatchNorm1d(1)
>>> x = torch.arange(10.0).reshape(10, 1)
>>> refresh_batchnorm(bn, [x[:8], x[8:]])
>>> bn.running_mean.item(), round(bn.running_var.item(), 4), bn.training
(4.5, 9.1667, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from curvops.data import SINGLE_SAMPLE_NOTE, move_to

__all__ = ["PooledMoments", "batchnorm_modules", "refresh_batchnorm"]


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules (1d, 2d, 3d, sync, lazy) of ``model``, in module order.

    >>> len(batchnorm_modules(torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Tanh())))
    1
    """
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class PooledMoments:
    r"""Per-channel count, mean and sum of squared deviations of a BatchNorm module's
    inputs, merged batch by batch with the parallel update of Chan, Golub & LeVeque.

    A batch :math:`x` (channels on dimension 1, reduced over all others: the samples
    and, for ``BatchNorm2d``/``3d`` or ``(N, C, L)`` inputs, the positions) adds
    :math:`n_b` values per channel with mean :math:`\mu_b` and :math:`M_b=\sum(x-\mu_b)^2`:

    .. math::
        n' = n + n_b,\quad \delta = \mu_b - \mu,\quad \mu' = \mu + \delta\,\frac{n_b}{n'},\quad
        M' = M + M_b + \delta^2\,\frac{n\,n_b}{n'} .

    Accumulated in float64 (float32 on devices without it).
    """

    def __init__(self) -> None:
        self.count = 0
        self.batches = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        values = x.detach().to(wide)
        dims = [d for d in range(values.dim()) if d != 1]
        n_b = values.numel() // values.shape[1]
        mean_b = values.mean(dim=dims)
        shape = [1, -1] + [1] * (values.dim() - 2)
        m2_b = (values - mean_b.reshape(shape)).square().sum(dim=dims)
        self.batches += 1
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / total)
        self.count = total


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, batches: Iterable[Any], group: Any = None) -> None:
    """Set the running statistics of ``model``'s BatchNorm modules to the exact mean and
    unbiased variance of their inputs over one pass of ``batches`` (the module docstring).

    Parameters
    ----------
    model:
        The network; its BatchNorm modules that track running statistics are run in
        train mode for the pass and then put back in their modes.  The other modules
        keep their modes (a model in train mode draws its dropout masks: fork the random
        streams around the call to keep them).
    batches:
        The model's inputs, batch by batch: a tensor, a tuple (``model(*x)``) or a
        mapping (``model(**x)``), moved to the parameters' device and floating dtype.
    group:
        A process group whose ranks each hold a shard of the batches: the ranks'
        moments are pooled exactly, in two ``all_reduce`` calls.

    A module the pass never reaches gets reset statistics; ``num_batches_tracked`` is the
    number of batches that reached it.
    """
    from nets.workflow._forward import call_model  # (nets.workflow imports this module)

    modules = [m for m in batchnorm_modules(model) if m.track_running_stats]
    if not modules:
        return
    first = next(iter(model.parameters()))
    moments = {id(m): PooledMoments() for m in modules}
    modes = [m.training for m in modules]

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        moments[id(module)].add(args[0])

    hooks = [m.register_forward_pre_hook(record) for m in modules]
    for m in modules:
        m.reset_running_stats()
        m.train()
    try:
        for index, inputs in enumerate(batches):
            try:
                call_model(model, move_to(inputs, first.device, first.dtype))
            except ValueError as exc:  # PyTorch's bare refusal of a one-sample batch
                if "more than 1 value per channel when training" in str(exc):
                    where = f"the BatchNorm statistics' batch {index}"
                    exc.add_note(SINGLE_SAMPLE_NOTE.format(where=where, remedy=""))
                raise
        pooled = [moments[id(m)] for m in modules]
        if group is not None:
            _combine_over_ranks(modules, pooled, group)
        for m, pool in zip(modules, pooled):
            if pool.mean is None or pool.m2 is None:
                continue  # not reached by the forward pass: reset statistics
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(pool.mean)
            m.running_var.copy_(pool.m2 / max(pool.count - 1, 1))
            m.num_batches_tracked.fill_(pool.batches)  # type: ignore[union-attr]
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in zip(modules, modes):
            m.train(mode)


def _combine_over_ranks(
    modules: list[nn.modules.batchnorm._BatchNorm], pooled: list[PooledMoments], group: Any
) -> None:
    r"""Pool the ranks' moments exactly, in two ``all_reduce``: first the counts, batch
    counts and sums :math:`n_r\mu_r` (the global mean :math:`\mu`), then
    :math:`M_r + n_r(\mu_r-\mu)^2` (the global squared deviations, without a difference
    of large sums).  A rank whose shard has no batch contributes zeros."""
    from curvops.distributed import all_reduce_sum

    for m, pool in zip(modules, pooled):
        if pool.mean is None or pool.m2 is None:
            assert m.running_mean is not None
            pool.mean = torch.zeros_like(m.running_mean, dtype=torch.float64)
            pool.m2 = torch.zeros_like(pool.mean)
    means_in = [cast(torch.Tensor, p.mean).double() for p in pooled]
    counts = [torch.tensor([p.count, p.batches], dtype=torch.float64) for p in pooled]
    k = len(pooled)
    summed = all_reduce_sum(
        [c.to(mu.device) for c, mu in zip(counts, means_in)]
        + [mu * p.count for mu, p in zip(means_in, pooled)],
        group,
    )
    means = [summed[k + i] / summed[i][0] for i in range(k)]
    spreads = [
        cast(torch.Tensor, p.m2).double() + p.count * (mu_r - mu).square()
        for p, mu_r, mu in zip(pooled, means_in, means)
    ]
    m2s = all_reduce_sum(spreads, group)
    for i, pool in enumerate(pooled):
        pool.count, pool.batches = int(summed[i][0].item()), int(summed[i][1].item())
        pool.mean, pool.m2 = (means[i], m2s[i]) if pool.count else (None, None)

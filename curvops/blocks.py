"""Per-layer (block-diagonal) curvature operators.

:func:`per_layer` builds one curvature operator per layer (the parameters owned by
one module) and stacks them into a :class:`curvops.algebra.BlockDiagonal`, the
block-diagonal approximation

.. math::
    \\mathrm{diag}(A_{11}, \\dots, A_{LL}), \\qquad A_{ll} = \\text{curvature w.r.t. layer } l,

so per-layer spectra take one call: ``per_layer(...).blocks[l]`` is layer ``l``'s
operator.  Each block loops over the data separately (a product costs ``L`` passes).

>>> import torch
>>> from curvops.hessian import HessianOperator
>>> nn = torch.nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
>>> data = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
>>> B = per_layer(HessianOperator, net, torch.nn.MSELoss(), data)
>>> [b.shape for b in B.blocks]
[(6, 6), (3, 3)]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from curvops.algebra import BlockDiagonal
from curvops.curvature import ModelCurvatureOperator
from curvops.data import as_data
from curvops.losses import LossFn
from curvops.params import group_by_layer, select_params
from spectral.errors import argument_error

__all__ = ["per_layer"]


def per_layer(
    operator_cls: type[ModelCurvatureOperator],
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: Any = None,
    **kwargs: Any,
) -> BlockDiagonal:
    """Block-diagonal operator with one ``operator_cls`` block per layer.

    Parameters
    ----------
    operator_cls:
        :class:`~curvops.HessianOperator`, :class:`~curvops.GGNOperator`,
        :class:`~curvops.FisherOperator` (or another subclass of
        :class:`~curvops.curvature.ModelCurvatureOperator`).
    params:
        Parameter selection (default all trainable), grouped by owning module.
    kwargs:
        Passed to every block (``bn_mode``, ``kind``, ``seed``, ...).

    Raises
    ------
    TypeError
        If ``operator_cls`` is not a model curvature operator class.
    """
    if not (isinstance(operator_cls, type) and issubclass(operator_cls, ModelCurvatureOperator)):
        raise argument_error(
            "operator_cls", "a ModelCurvatureOperator subclass", operator_cls, kind=TypeError
        )
    stream = as_data(data)
    groups = group_by_layer(select_params(model, params))
    blocks = [
        operator_cls(model, loss_fn, stream, params=[n for n, _ in g], **kwargs) for g in groups
    ]
    return BlockDiagonal(blocks)

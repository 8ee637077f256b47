"""The generalised Gauss-Newton matrix of the mean loss as a linear operator.

.. math::
    G = \\frac{1}{N}\\sum_b N_b\\, J_b^\\top\\, \\nabla^2_f L_b\\, J_b,

the first term of the paper's Eq. 3, with :math:`J_b = \\partial f/\\partial w` the
Jacobian of the network outputs on batch :math:`b`.  Positive semi-definite for
convex losses (cross-entropy, MSE, BCE-with-logits, whose output Hessians are used
in closed form, see :mod:`curvops.losses`); other losses use autograd at the
outputs (the operator is then flagged not-psd).  Each product shares one forward
pass (dual numbers give the outputs and :math:`Jv` together) with one backward pass.

>>> import torch
>>> net = torch.nn.Linear(3, 2).double()
>>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
>>> G = GGNOperator(net, torch.nn.CrossEntropyLoss(), (x, y))
>>> G.psd, G.num_params
(True, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvops.curvature import ModelCurvatureOperator
from curvops.data import Batch
from curvops.losses import LossFn, loss_family, output_hessian_matmat
from curvops.products import jacobian_sandwich_matmat

__all__ = ["GGNOperator"]

_CONVEX_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, nn.NLLLoss)


def _convex(loss_fn: Any) -> bool:
    """Losses convex in the outputs (the torch modules, subclasses, and functions)."""
    return isinstance(loss_fn, _CONVEX_LOSSES) or loss_family(loss_fn) is not None


class GGNOperator(ModelCurvatureOperator):
    """GGN (Gauss-Newton) matrix of the mean loss over ``data``.

    Parameters are those of :class:`curvops.curvature.ModelCurvatureOperator`.

    Raises
    ------
    ValueError, TypeError
        Bad data, parameters, ``bn_mode`` or a loss without mean reduction.
    spectral.errors.NumericalError
        A product with NaN/Inf (names the batch).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        params: Any = None,
        bn_mode: str | None = None,
        progress: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            bn_mode=bn_mode,
            progress=progress,
            process_group=process_group,
            psd=_convex(loss_fn),
        )

    def _batch_matmat(self, batch: Batch, V: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs, targets = self._batch_on_device(batch)
        loss_fn = self.loss_fn

        def curvature(outputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda U: output_hessian_matmat(loss_fn, outputs, targets, U)

        return jacobian_sandwich_matmat(
            self._forward_fn(inputs), self.current_params(), V, curvature
        )

"""The generalised Gauss-Newton matrix of the mean loss as a linear operator.

.. math::
    G = \\frac{1}{N}\\sum_b N_b\\, J_b^\\top\\, \\nabla^2_f L_b\\, J_b,

the first term of the paper's Eq. 3, with :math:`J_b = \\partial f/\\partial w` the
Jacobian of the network outputs on batch :math:`b`.  Positive semi-definite for
convex losses (cross-entropy, MSE, BCE-with-logits, whose output Hessians are used
in closed form, see :mod:`curvops.losses`); other losses use autograd at the
outputs (the operator is then flagged not-psd).  With one batch (``cache``) the
forward pass and :math:`g(u) = J^\\top u` are recorded once per parameter state and
a product costs one tangent forward and one backward pass through them
(:func:`curvops.products.jacobian_graph`); otherwise each product shares one forward
pass (dual numbers give the outputs and :math:`Jv` together) with one backward pass.
``linearize=True`` traces :math:`J` with ``torch.func`` instead
(:func:`curvops.products.jacobian_sandwich_linearization`).

>>> import torch
>>> net = torch.nn.Linear(3, 2).double()
>>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
>>> G = GGNOperator(net, torch.nn.CrossEntropyLoss(), (x, y))
>>> G.psd, G.num_params
(True, 8)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvops.curvature import ModelCurvatureOperator
from curvops.data import Batch
from curvops.losses import LossFn, check_curved_loss, loss_family, output_hessian_operator
from curvops.model_io import OutputFn
from curvops.products import (
    JacobianSandwichLinearization,
    OutputCurvature,
    jacobian_sandwich_linearization,
    jacobian_sandwich_matmat,
)
from curvops.validation import checked_on_ranks
from spectral.errors import argument_error

__all__ = ["GGNOperator"]

logger = logging.getLogger(__name__)

_CONVEX_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, nn.NLLLoss)


def _convex(loss_fn: Any) -> bool:
    """Losses convex in the outputs (the torch modules, subclasses, and functions)."""
    return isinstance(loss_fn, _CONVEX_LOSSES) or loss_family(loss_fn) is not None


class GGNOperator(ModelCurvatureOperator):
    """GGN (Gauss-Newton) matrix of the mean loss over ``data``.

    Parameters
    ----------
    model, loss_fn, data, params, bn_mode, progress, process_group, output_fn:
        See :class:`curvops.curvature.ModelCurvatureOperator`.
    cache:
        Keep each batch's forward graph and :math:`J^\\top u` graph between products
        (:func:`curvops.products.jacobian_graph`), reused while parameters,
        buffers, train/eval flags and batch tensors are unchanged (compared bitwise:
        edits through ``.data`` are seen too): measured 0.9-1.3
        gradient-times per product against 1.6-3.0 (151k-parameter BatchNorm CNN at
        batch 256 in both modes, PreResNet8, an MLP on digits; one CPU thread), for
        a one-off cost of about one gradient.  Memory held: the forward activations
        plus one output-gradient tensor per layer, for every cached batch.  Default
        (None): on for one batch, off for a sequence of batches (pass ``cache=True``
        when every batch's graphs fit in memory together); never applied to a
        DataLoader.
    lean_kernels:
        Record the cached graphs with :func:`curvops.lean_ops.lean_double_backward`
        (default); without it the :math:`Jv` of the cached path costs about as much
        as a Hessian product.
    linearize:
        With one batch, trace the Jacobian with ``torch.func.linearize`` and
        ``torch.func.vjp`` instead of recording the lean graphs of ``cache``, and
        reuse the trace while parameters, buffers, modes and batch tensors are
        unchanged: 1.0-1.3 gradient-times per product on the benchmark CNNs (batch
        16-128), about the cached default's (0.8-1.3), for a tracing cost of ~7-19
        gradient-times plus ~1.3-2.8 s for the first trace in a process.  Worth it
        only for models whose layers the lean kernels do not cover, over long runs
        at one parameter state.  Memory held between products: the forward
        activations plus the traced tangent graph (+190 MiB for 128 CIFAR-shaped
        images through a 151k-parameter CNN).  Refused (``ValueError``) for models
        with ``nn.RNN``/``nn.LSTM``/``nn.GRU``, whose tangents ``torch.func.linearize``
        traces wrongly.  Ignored for several batches.  Each trace is checked against
        one untraced product on a probe vector (its cost, 1.6-3 gradient-times, adds
        to the trace's) (agreement to :math:`\\sqrt{\\epsilon}`
        relative; ``torch.func.linearize`` has traced models wrongly): if they differ,
        or tracing fails, the operator falls back to the default path (logged).

    Contracts: one fixed matrix (loaders replayed or refused, no randomness during
    products), the model as it is now, nothing of the model changes; see
    :class:`curvops.curvature.ModelCurvatureOperator`.

    Raises
    ------
    ValueError, TypeError
        Bad data, parameters, ``bn_mode`` or a loss without mean reduction.
    spectral.errors.NumericalError
        A product with NaN/Inf (names the batch).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> G = GGNOperator(net, loss, (x, y))
    >>> from curvops.testing import dense_ggn
    >>> v = torch.randn(G.shape[0], dtype=torch.float64)
    >>> bool(torch.allclose(G @ v, dense_ggn(net, loss, (x, y)) @ v))
    True
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
        cache: bool | None = None,
        lean_kernels: bool = True,
        output_fn: OutputFn | None = None,
        linearize: bool = False,
    ) -> None:
        # a rank whose loss is refused still joins the construction's collective
        checked_on_ranks(lambda: check_curved_loss(loss_fn), process_group)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            bn_mode=bn_mode,
            progress=progress,
            process_group=process_group,
            psd=_convex(loss_fn),
            output_fn=output_fn,
        )
        self._validation.check_outputs_before_the_loss(type(self).__name__)
        self._linearize = bool(linearize) and self.data.is_single_batch
        if self._linearize:
            _refuse_recurrent_linearization(model)
        self._configure_cache(cache, lean_kernels)

    def _linearization(
        self, batch: Batch, inputs: Any, curvature: OutputCurvature
    ) -> JacobianSandwichLinearization | None:
        """The traced Jacobian of the single batch (None: off, or tracing failed)."""
        if not self._linearize:
            return None

        def trace() -> JacobianSandwichLinearization:
            params = self.current_params()
            traced = jacobian_sandwich_linearization(self._forward_fn(inputs), params, curvature)
            gap = _trace_gap(traced, self._forward_fn(inputs), params, curvature)
            if gap is not None:
                raise _TraceMismatch(gap)
            return traced

        try:
            return self._cached(batch, trace, always=True)
        except _TraceMismatch as exc:
            logger.warning(
                "GGNOperator(linearize=True): the traced product differs from the "
                "untraced one by %.2g (relative) on a probe vector; torch.func.linearize "
                "traced this model wrongly, so the untraced product is used",
                exc.gap,
            )
        except Exception as exc:  # torch.func cannot trace every model
            logger.info("GGNOperator: tracing failed (%r); using the untraced product", exc)
        self._linearize = False
        return None

    def _batch_matmat(self, batch: Batch, V: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs, targets = self._batch_on_device(batch)
        loss_fn = self.loss_fn

        def curvature(outputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            return output_hessian_operator(loss_fn, outputs, targets)

        traced = self._linearization(batch, inputs, curvature)
        if traced is not None:
            return traced.apply(V)
        return self._sandwich_matmat(batch, inputs, V, curvature)


class _TraceMismatch(Exception):
    def __init__(self, gap: float) -> None:
        super().__init__(gap)
        self.gap = gap


def _trace_gap(
    traced: JacobianSandwichLinearization,
    forward: Callable[[list[torch.Tensor]], torch.Tensor],
    params: list[torch.Tensor],
    curvature: OutputCurvature,
) -> float | None:
    """The relative gap between the traced and the untraced product on one probe vector,
    where it exceeds :math:`\\sqrt{\\epsilon}` (None: they agree).

    Both compute :math:`J^\\top Q J v` in a different order, so they agree to rounding
    (a few hundred :math:`\\epsilon` relative in the tests); ``torch.func.linearize``
    has traced models wrongly (recurrent kernels; a softmax row of ``-inf`` followed by
    ``nan_to_num``: 35 % off, finite), which one product at trace time detects.
    """
    gen = torch.Generator(device=params[0].device).manual_seed(0)
    probe = [
        torch.randn((1, *p.shape), dtype=p.dtype, device=p.device, generator=gen) for p in params
    ]
    got = torch.cat([t.reshape(-1) for t in traced.apply(probe)])
    want = torch.cat(
        [t.reshape(-1) for t in jacobian_sandwich_matmat(forward, params, probe, curvature)]
    )
    scale = float(torch.linalg.vector_norm(want))
    gap = float(torch.linalg.vector_norm(got - want))
    tol = float(torch.finfo(want.dtype).eps) ** 0.5 * scale
    if math.isfinite(gap) and gap <= tol:
        return None
    return gap / scale if scale > 0 else math.inf


def _refuse_recurrent_linearization(model: nn.Module) -> None:
    """Refuse ``linearize=True`` on a model with ``nn.RNN``/``nn.LSTM``/``nn.GRU``.

    ``torch.func.linearize`` traced wrong tangents through PyTorch's recurrent kernels
    (torch 2.13): the GGN came out non-symmetric and indefinite, 2-99 % away from the
    finite differences that the default paths match to 5e-11.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            raise argument_error(
                "linearize",
                "False for models with recurrent layers (torch.func.linearize traces "
                f"wrong tangents through {type(module).__name__}, submodule {name!r}: a "
                "non-symmetric GGN); the default path (linearize=False) is exact",
                True,
            )

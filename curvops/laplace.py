r"""curvops as a laplace-torch backend: ``Laplace(..., backend=curvops.laplace.GGN)``.

Backends implementing laplace-torch's ``CurvatureInterface`` (``full``, ``diag``,
``kron``) with this package's operators: :class:`GGN` (exact GGN; ``stochastic=True``:
the Monte-Carlo Fisher), :class:`EF` (empirical Fisher) and :class:`Hessian` (``full``
only).  laplace-torch works with *summed* losses (``CrossEntropyLoss(reduction="sum")``
and ``0.5 * MSELoss(reduction="sum")``): its backends return the curvature of the
loss summed over the batch (as its own ``CurvlinopsGGN`` does).  The operators here
(:class:`~curvops.GGNOperator`, :class:`~curvops.FisherOperator`,
:class:`~curvops.HessianOperator`, :func:`~curvops.ggn_diagonal`,
:class:`~curvops.KFACOperator`) are built on the mean-reduced twin of laplace's loss
(the same ``ignore_index``, class ``weight`` and ``label_smoothing``), whose mean is
the sum divided by the loss's own normaliser :math:`\nu_b`
(:func:`curvops.losses.batch_weight`), so their curvature is multiplied by
:math:`\nu_b` and by laplace's ``factor``: for cross-entropy the number of counted
targets (every position of an ``(N, C, T)`` output, none at ``ignore_index``; the
summed class weights :math:`\sum w_{y}` with ``weight=``), not the batch size; for
MSE the number of elements :math:`N_b C` (it averages over the outputs too).

``kron`` uses :class:`~curvops.KFACOperator` with the weight and bias in separate
blocks (laplace's layout), so it equals laplace's curvlinops backend; parameters
outside ``Linear``/``Conv2d`` layers (BatchNorm, LayerNorm, ...), which the curvlinops
backend refuses, get their exact diagonal as a one-factor block instead.  The
operators' BatchNorm mode is the model's own (``bn_mode=None``), and the model is never
changed.

Importing this module requires ``laplace-torch`` (the ``laplace`` extra).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, cast

import torch
from torch import nn

from curvops.diagonal import ggn_diagonal
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.kfac import KFACOperator
from curvops.losses import batch_weight
from spectral.errors import argument_error

__all__ = ["EF", "GGN", "Hessian"]

try:  # an optional peer: without it the module imports and the backends refuse to build
    from laplace.curvature import (  # type: ignore[import-not-found,unused-ignore]
        CurvatureInterface,
        EFInterface,
        GGNInterface,
    )
    from laplace.utils import Kron  # type: ignore[import-not-found,unused-ignore]

    _MISSING: ImportError | None = None
except ImportError as err:  # pragma: no cover - exercised where laplace-torch is absent
    _MISSING = err

    class CurvatureInterface:  # type: ignore[no-redef]
        """Placeholder base: laplace-torch is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(
                "curvops.laplace needs laplace-torch (pip install laplace-torch)"
            ) from _MISSING

    GGNInterface = EFInterface = CurvatureInterface  # type: ignore[misc,assignment]
    Kron = None  # type: ignore[misc,assignment]

Inputs = torch.Tensor | MutableMapping[str, Any]


class _CurvopsInterface(CurvatureInterface):
    """Shared plumbing: the mean-loss twin of laplace's summed loss and its scale."""

    _fisher = "type2"

    def _mean_loss(self) -> nn.Module:
        """laplace's summed loss with ``reduction="mean"`` and its other settings."""
        loss = self.lossfunc
        if isinstance(loss, nn.CrossEntropyLoss):
            return nn.CrossEntropyLoss(
                weight=loss.weight,
                ignore_index=loss.ignore_index,
                label_smoothing=loss.label_smoothing,
            )
        return nn.MSELoss()

    def _check_input(self, x: Inputs) -> torch.Tensor:
        if self.last_layer:
            raise NotImplementedError("curvops.laplace: last-layer Laplace is not supported")
        if isinstance(x, MutableMapping):
            raise argument_error(
                "x", "a tensor batch (dict inputs are not supported by curvops.laplace)", x
            )
        return x

    def _scale(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """:math:`\\nu_b` times laplace's factor: summed loss = :math:`\\nu_b` x mean loss.

        :math:`\\nu_b` is the mean's own normaliser (:func:`curvops.losses.batch_weight`:
        the counted targets of a cross-entropy, the elements of an MSE), so the result
        is the curvature of laplace's summed loss however many terms a sample holds.
        """
        terms = batch_weight(self._mean_loss(), x, y, int(x.shape[0]))
        return float(terms) * float(self.factor)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            f = self.model(x)
            return self.factor * self.lossfunc(f, y), f

    def _operator(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        raise NotImplementedError

    def full(self, x: Inputs, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_input(x)
        loss, _ = self._loss(x, y)
        H = self._operator(x, y).to_dense() * self._scale(x, y)
        return loss, H

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_input(x)
        loss, _ = self._loss(x, y)
        method = {"type2": "exact", "mc": "mc", "empirical": "empirical"}[self._fisher]
        d = ggn_diagonal(self.model, self._mean_loss(), (x, y), method=method, params=self.params)
        return loss, d * self._scale(x, y)

    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        x = self._check_input(x)
        loss, _ = self._loss(x, y)
        K = KFACOperator(
            self._model,
            self._mean_loss(),
            (x, y),
            params=self.params,
            fisher=self._fisher,
            approx=str(kwargs.get("kfac_approx", "expand")),
            bias="separate",
            remainder="diagonal",
        )
        scale = self._scale(x, y)
        factors = dict(zip((id(b) for b in K.blocks), K.factors()))
        by_param: dict[str, list[torch.Tensor]] = {}
        for block in K.blocks:
            G, A = factors[id(block)]
            if block.part == "bias":
                by_param[block.names[0]] = [G * scale]
            elif G.numel() == 1 and A.numel() == 1:
                by_param[block.names[0]] = [G * A * scale]
            else:
                by_param[block.names[0]] = [G * scale, A * len(y) / N]
        covered = set(by_param)
        remainder = K.remainder_diagonal() * scale
        start = 0
        for name in K.param_names:
            if name in covered:
                continue
            size = dict(self._model.named_parameters())[name].numel()
            by_param[name] = [torch.diag(remainder[start : start + size])]
            start += size
        return loss, Kron(cast(Any, [by_param[name] for name in K.param_names]))


class GGN(_CurvopsInterface, GGNInterface):
    """The GGN (``stochastic=True``: the Monte-Carlo Fisher) from curvops operators."""

    def __init__(self, *args: Any, stochastic: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stochastic = stochastic
        self._fisher = "mc" if stochastic else "type2"

    def _operator(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        if self.stochastic:
            return FisherOperator(self._model, self._mean_loss(), (x, y), params=self.params)
        return GGNOperator(self._model, self._mean_loss(), (x, y), params=self.params)


class EF(_CurvopsInterface, EFInterface):
    """The empirical Fisher from curvops operators."""

    _fisher = "empirical"

    def _operator(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return FisherOperator(
            self._model, self._mean_loss(), (x, y), params=self.params, kind="empirical"
        )


class Hessian(_CurvopsInterface):
    """The exact Hessian (``full`` only; ``diag`` and ``kron`` are GGN quantities)."""

    def _operator(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return HessianOperator(self._model, self._mean_loss(), (x, y), params=self.params)

    def diag(self, x: Inputs, y: torch.Tensor, **kwargs: Any) -> Any:
        raise NotImplementedError("curvops.laplace.Hessian: use hessian_structure='full'")

    def kron(self, x: Inputs, y: torch.Tensor, N: int, **kwargs: Any) -> Any:
        raise NotImplementedError("curvops.laplace.Hessian: use hessian_structure='full'")

"""The Fisher information matrix (Monte-Carlo or empirical) as a linear operator.

With the loss per sample written as :math:`c\\,\\mathrm{NLL}(f_n, y_n)` (see
:mod:`curvops.losses`),

.. math::
    F = \\frac{1}{N}\\sum_n c\\; J_n^\\top\\, \\overline{s_n s_n^\\top}\\, J_n, \\qquad
    s_n = \\nabla_{f_n} \\mathrm{NLL}(f_n, \\tilde y_n),

where for ``kind="mc"`` the bar averages ``mc_samples`` targets
:math:`\\tilde y_n` drawn from the model's predictive distribution (an unbiased
estimate of the GGN), and for ``kind="empirical"`` :math:`\\tilde y_n = y_n` (the
true targets: the sum of outer products of per-sample gradients,
:math:`\\frac{c}{N}\\sum_n \\nabla_w\\mathrm{NLL}_n \\nabla_w \\mathrm{NLL}_n^\\top`; for
cross-entropy :math:`c = 1`).  The samples of batch ``b`` come from a generator seeded
by ``(seed, b)``, so the operator is one fixed matrix: every product uses the same
samples, and the same seed gives bitwise the same products.

>>> import torch
>>> net = torch.nn.Linear(3, 2).double()
>>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
>>> F = FisherOperator(net, torch.nn.CrossEntropyLoss(), (x, y), kind="mc", mc_samples=2)
>>> F.kind, F.psd
('mc', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvops.curvature import ModelCurvatureOperator
from curvops.data import Batch
from curvops.losses import (
    LossFn,
    batch_generator,
    loss_family,
    loss_kind,
    nll_scale,
    per_sample_nll_grads,
    sample_targets,
)
from curvops.model_io import OutputFn
from spectral.errors import argument_error

__all__ = ["FisherOperator", "fisher_output_factor"]


def fisher_output_factor(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample output-space factor ``S`` (N, C, r) of the batch Fisher.

    :math:`F_b = J^\\top \\mathrm{blockdiag}_n(S_n S_n^\\top) J` with the batch mean
    :math:`1/N_b`, the scale :math:`c` and :math:`1/M` folded into ``S``.
    """
    n = outputs.shape[0]
    c = nll_scale(loss_kind(loss_fn, outputs, targets), outputs)
    if kind == "empirical":
        s = per_sample_nll_grads(loss_fn, outputs, targets).unsqueeze(-1)
        return s * math.sqrt(c / n)
    if generator is None:
        raise argument_error("generator", "a torch.Generator for kind='mc'", generator)
    sampled = sample_targets(loss_fn, outputs, targets, mc_samples, generator)
    grads = [per_sample_nll_grads(loss_fn, outputs, t) for t in sampled]
    return torch.stack(grads, dim=-1) * math.sqrt(c / (n * mc_samples))


class FisherOperator(ModelCurvatureOperator):
    """Fisher matrix of the model's likelihood over ``data``.

    Parameters
    ----------
    model, loss_fn, data, params, bn_mode, progress, process_group, output_fn:
        See :class:`curvops.curvature.ModelCurvatureOperator`.
    kind:
        ``"mc"`` (targets sampled from the model; needs CrossEntropyLoss, MSELoss or
        BCEWithLogitsLoss) or ``"empirical"`` (true targets; any loss separable over
        samples).
    mc_samples:
        Targets drawn per sample for ``kind="mc"``.
    seed:
        Seed of the Monte-Carlo targets.
    cache, lean_kernels:
        As for :class:`curvops.GGNOperator`: with one batch (default) the forward
        pass and :math:`J^\\top u` are recorded once and reused while the model state,
        the batch, ``kind``, ``mc_samples`` and ``seed`` are unchanged (the sampled
        targets depend on ``seed`` and the batch index only).

    Raises
    ------
    ValueError, TypeError
        Bad arguments (see the base class), unknown ``kind``, ``mc_samples < 1``.
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
        kind: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        cache: bool | None = None,
        lean_kernels: bool = True,
        output_fn: OutputFn | None = None,
    ) -> None:
        if kind not in ("mc", "empirical"):
            raise argument_error("kind", "'mc' or 'empirical'", kind)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise argument_error("mc_samples", "an integer >= 1", mc_samples)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise argument_error("seed", "an integer", seed, kind=TypeError)
        if kind == "mc" and loss_family(loss_fn) not in ("ce", "mse", "bce"):
            raise argument_error(
                "loss_fn",
                "CrossEntropyLoss, MSELoss or BCEWithLogitsLoss for kind='mc' (use 'empirical')",
                loss_fn,
            )
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            bn_mode=bn_mode,
            progress=progress,
            process_group=process_group,
            psd=True,
            output_fn=output_fn,
        )
        self.kind = kind
        self.mc_samples = mc_samples
        self.seed = seed
        self._configure_cache(cache, lean_kernels)

    def _state_key(self, batch: Batch) -> tuple[Any, ...]:
        return (*super()._state_key(batch), self.kind, self.mc_samples, self.seed)

    def _batch_matmat(self, batch: Batch, V: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs, targets = self._batch_on_device(batch)
        loss_fn, kind, m = self.loss_fn, self.kind, self.mc_samples
        generator = batch_generator(self.seed, batch.index) if kind == "mc" else None

        def curvature(outputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            S = fisher_output_factor(
                loss_fn, outputs, targets, kind=kind, mc_samples=m, generator=generator
            )
            n = outputs.shape[0]

            def apply(U: torch.Tensor) -> torch.Tensor:
                flat = U.reshape(U.shape[0], n, -1)
                coeff = torch.einsum("ncr,knc->knr", S, flat)
                return torch.einsum("ncr,knr->knc", S, coeff).reshape(U.shape)

            return apply

        return self._sandwich_matmat(batch, inputs, V, curvature)

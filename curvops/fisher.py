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
cross-entropy :math:`c = 1`).  In the notation of :mod:`curvops.losses`, a batch whose loss
is :math:`L_b = S_b/\\nu_b` (or :math:`S_b` for ``reduction="sum"``, :math:`\\nu_b = 1`) has

.. math::
    F_b = \\frac{1}{\\nu_b}\\sum_n J_n^\\top s_n s_n^\\top J_n, \\qquad
    s_n = \\nu_b\\, \\frac{\\partial L_b}{\\partial f_n}
    \\;(\\text{empirical, } \\texttt{per="sample"}),

the gradient of the sum of the sample's terms (over all its positions and outputs), and
batches combine as :math:`F = \\sum_b \\nu_b F_b / \\sum_b \\nu_b` (mean) or
:math:`\\sum_b F_b` (sum).  ``per="position"`` splits every sample into its output
positions :math:`r` (the rows of the outputs with the class dimension last: dimension 1 for
cross-entropy, the last one otherwise; a sequence's tokens, an image's pixels) and uses
:math:`F_b = \\frac{1}{\\nu_b}\\sum_r J_r^\\top s_r s_r^\\top J_r`,
:math:`s_r = \\nu_b\\,\\partial L_b/\\partial f_r` -- curvlinops' ``EFLinearOperator``.
The two agree on ``(N, C)`` outputs.  The samples of batch ``b`` come from a generator seeded
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
    batch_normaliser,
    class_dim,
    fisher_scale,
    loss_family,
    loss_reduction,
    output_gradient,
    per_sample_nll_grads,
    sample_targets,
)
from curvops.model_io import OutputFn
from curvops.validation import checked_on_ranks
from spectral.errors import argument_error

__all__ = ["FisherOperator", "fisher_output_factor", "position_output_factor", "position_rows"]


def fisher_output_factor(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Per-sample output-space factor ``S`` (N, C, r) of the batch Fisher.

    :math:`F_b = J^\\top \\mathrm{blockdiag}_n(S_n S_n^\\top) J` with the scale
    :math:`1/\\nu_b` (mean; 1 for ``reduction="sum"``, see :func:`curvops.losses.fisher_scale`)
    and :math:`1/M` folded into ``S``.  ``normaliser``: :math:`\\nu_b` when known
    (default: from the loss and the targets).
    """
    if kind == "empirical":
        s = per_sample_nll_grads(loss_fn, outputs, targets, normaliser).unsqueeze(-1)
        return s * math.sqrt(fisher_scale(loss_fn, outputs, targets, normaliser))
    if generator is None:
        raise argument_error("generator", "a torch.Generator for kind='mc'", generator)
    sampled = sample_targets(loss_fn, outputs, targets, mc_samples, generator)
    # the counted positions and the closed form come from the true targets: a draw
    # equal to ignore_index (a pad id that is also a class) is a label, not padding
    grads = [
        per_sample_nll_grads(loss_fn, outputs, t, normaliser, true_targets=targets) for t in sampled
    ]
    scale = fisher_scale(loss_fn, outputs, targets, normaliser, mc_samples)
    return torch.stack(grads, dim=-1) * math.sqrt(scale)


def position_rows(loss_fn: LossFn, x: torch.Tensor, lead: int = 0) -> torch.Tensor:
    """``x`` (``lead`` leading dims, then an output shape) as rows ``(*lead, R, C)`` of positions.

    The class dimension (:func:`curvops.losses.class_dim`: 1 for cross-entropy/NLL, the
    last one otherwise) becomes the last; samples and every other dimension make the rows.
    """
    out_ndim = x.ndim - lead
    if out_ndim < 2:
        return x.reshape(*x.shape[:lead], -1, 1)
    dim = lead + class_dim(loss_fn, x[(0,) * lead] if lead else x)
    moved = x.movedim(dim, -1)
    return moved.reshape(*x.shape[:lead], -1, moved.shape[-1])


def position_output_factor(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, normaliser: float
) -> torch.Tensor:
    """Rows ``(R, C)`` :math:`\\sqrt{\\nu_b}\\, \\partial L_b/\\partial f_r` (mean; without
    :math:`\\sqrt{\\nu_b}` for sums), one per output position :math:`r`."""
    g = output_gradient(loss_fn, outputs, targets)
    if loss_reduction(loss_fn) == "mean":
        g = g * math.sqrt(normaliser)
    return position_rows(loss_fn, g)


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
    per:
        For ``kind="empirical"``: ``"sample"`` (default; one gradient per sample, summed
        over its output positions: :math:`\\frac{1}{\\nu_b}\\sum_n J_n^\\top s_n s_n^\\top J_n`
        with :math:`s_n = \\nu_b\\,\\partial L_b/\\partial f_n`) or ``"position"`` (one
        gradient per output position -- token, pixel -- as curvlinops'
        ``EFLinearOperator``; see the module docstring).  Both are the same for
        ``(N, C)`` outputs.
    seed:
        Seed of the Monte-Carlo targets.
    cache, lean_kernels:
        As for :class:`curvops.GGNOperator`: with one batch (default) the forward
        pass and :math:`J^\\top u` are recorded once and reused while the model state,
        the batch, ``kind``, ``mc_samples`` and ``seed`` are unchanged (the sampled
        targets depend on ``seed`` and the batch index only).

    Contracts: one fixed matrix (loaders replayed or refused, no randomness during
    products), the model as it is now, nothing of the model changes; see
    :class:`curvops.curvature.ModelCurvatureOperator`.

    Raises
    ------
    ValueError, TypeError
        Bad arguments (see the base class), unknown ``kind``, ``mc_samples < 1``.
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
    >>> F = FisherOperator(net, loss, (x, y), kind="mc", mc_samples=4, seed=0)
    >>> F.psd, F.shape
    (True, (26, 26))
    >>> v = torch.ones(26, dtype=torch.float64)
    >>> bool(torch.equal(F @ v, F @ v))   # one fixed matrix: the sampled targets are seeded
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
        kind: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        cache: bool | None = None,
        lean_kernels: bool = True,
        per: str = "sample",
        output_fn: OutputFn | None = None,
    ) -> None:
        # a rank whose arguments are refused still joins the construction's collective
        checked_on_ranks(lambda: _check_fisher(loss_fn, kind, per, mc_samples, seed), process_group)
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
            settings=_fisher_settings(kind, mc_samples, seed, per),
        )
        self._validation.check_outputs_before_the_loss(type(self).__name__)
        self.kind = kind
        self.mc_samples = mc_samples
        self.seed = seed
        self.per = per
        self._configure_cache(cache, lean_kernels)

    def _state_key(self, batch: Batch) -> tuple[Any, ...]:
        return (*super()._state_key(batch), self.kind, self.mc_samples, self.seed, self.per)

    def _batch_matmat(self, batch: Batch, V: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs, targets = self._batch_on_device(batch)
        loss_fn, kind, m = self.loss_fn, self.kind, self.mc_samples
        normaliser = batch_normaliser(loss_fn, inputs, targets, batch.size)
        per_position = self.per == "position"

        def curvature(outputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            if per_position:
                rows = position_output_factor(loss_fn, outputs, targets, normaliser)

                def apply_rows(U: torch.Tensor) -> torch.Tensor:
                    Ur = position_rows(loss_fn, U, lead=1)
                    coeff = torch.einsum("rc,krc->kr", rows, Ur)
                    out = torch.einsum("rc,kr->krc", rows, coeff)
                    if outputs.ndim < 2:
                        return out.reshape(U.shape)
                    dim = 1 + class_dim(loss_fn, outputs)
                    moved = U.movedim(dim, -1).shape
                    return out.reshape(moved).movedim(-1, dim)

                return apply_rows
            S = fisher_output_factor(
                loss_fn,
                outputs,
                targets,
                kind=kind,
                mc_samples=m,
                # a fresh generator per call: the same draws however often it is built
                generator=batch_generator(self.seed, batch.index) if kind == "mc" else None,
                normaliser=normaliser,
            )
            n = outputs.shape[0]

            def apply(U: torch.Tensor) -> torch.Tensor:
                flat = U.reshape(U.shape[0], n, -1)
                coeff = torch.einsum("ncr,knc->knr", S, flat)
                return torch.einsum("ncr,knr->knc", S, coeff).reshape(U.shape)

            return apply

        return self._sandwich_matmat(batch, inputs, V, curvature)


def _check_fisher(loss_fn: Any, kind: Any, per: Any, mc_samples: Any, seed: Any) -> None:
    """The arguments of :class:`FisherOperator` beyond the base class's."""
    if kind not in ("mc", "empirical"):
        raise argument_error("kind", "'mc' or 'empirical'", kind)
    if per not in ("sample", "position"):
        raise argument_error("per", "'sample' or 'position'", per)
    if per == "position" and kind != "empirical":
        raise argument_error("per", "'sample' for kind='mc' ('position' is empirical)", per)
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise argument_error("mc_samples", "an integer >= 1", mc_samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise argument_error("seed", "an integer", seed, kind=TypeError)
    if kind == "mc" and loss_family(loss_fn) not in ("ce", "mse", "bce", "seq_ce"):
        raise argument_error(
            "loss_fn",
            "CrossEntropyLoss, MSELoss, BCEWithLogitsLoss or "
            "curvops.losses.sequence_cross_entropy for kind='mc' (use 'empirical')",
            loss_fn,
        )


def _fisher_settings(kind: str, mc_samples: int, seed: int, per: str) -> dict[str, Any]:
    """The settings that change a Fisher's matrix, which every rank of a process group must
    share (:func:`curvops.validation.validate_across_ranks`): ``kind``; the Monte-Carlo
    ``mc_samples`` and ``seed`` (``kind="mc"``); ``per`` (``kind="empirical"``)."""
    if kind == "mc":
        return {"kind": kind, "mc_samples": mc_samples, "seed": seed}
    return {"kind": kind, "per": per}

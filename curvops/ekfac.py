r"""E-KFAC as an operator: K-FAC's eigenbasis with the eigenvalues re-fitted to the truth.

George et al. (2018): keep the eigenvectors :math:`U_G \otimes U_A` of each K-FAC block
(:class:`curvops.KFACOperator`) and replace its eigenvalues
:math:`\lambda_{G,i}\lambda_{A,j}` by the diagonal of the exact curvature block in that
basis,

.. math::

    \Lambda = \frac1N \sum_b N_b \sum_{n \in b} \sum_j
    \Bigl(U_G^\top \bigl(\textstyle\sum_t g^{(j)}_{n,t} a_{n,t}^\top\bigr) U_A\Bigr)^{\odot 2},

with the per-sample gradients :math:`\sum_t g^{(j)}_{n,t} a_{n,t}^\top` of the factor
columns of :mod:`curvops.kronecker` (output Hessian square roots for ``"type2"``,
sampled or true-label NLL gradients for ``"mc"`` / ``"empirical"``).  For ``"type2"``
the columns :math:`j = (t', c)` are one per loss position :math:`t'` and column
:math:`c` of the output Hessian square root, each supported on a single loss term of
the sample, so that :math:`\sum_j (\cdot)(\cdot)^\top` is the exact GGN block and
:math:`\Lambda = \operatorname{diag}\bigl((U_G \otimes U_A)^\top G_{\rm block}
(U_G \otimes U_A)\bigr)` exactly, also with weight sharing (a ``Linear`` on ``[B, T, D]``
with a per-token loss, a ``Conv2d`` with a per-pixel loss) and position mixing
(attention, stacked convolutions); summing the loss positions in one column would add
cross-position terms :math:`g_{t'} g_{t''}^\top`.  MSE and BCE already have one column
per output element; a per-sample loss (``[N, C]`` outputs) has :math:`T' = 1`.  The
cost of this pass is :math:`T' (C - 1)` instead of :math:`C - 1` backward passes per
batch for a cross-entropy over :math:`T'` positions and :math:`C` classes (batched, 32
columns per backward; a 16-token, 10-class attention layer at batch 32: 0.16 s instead
of 0.03 s on one CPU thread), which is prohibitive for language models with large
vocabularies: use ``fisher="mc"`` there (sampled labels per token make the cross terms
vanish in expectation; one column per MC sample).  More than
:data:`curvops.kronecker.MAX_FACTOR_COLUMNS` columns per batch are refused (a
``ValueError`` naming ``fisher``) rather than run for hours.  With samples coupled by
train-mode BatchNorm (``bn_mode="train"``, or ``None`` on a model in train mode) a column
of loss sample :math:`n` reaches every sample :math:`m` of a layer before the BatchNorm,
and its pullback to the weight is :math:`\sum_m \sum_t g^{(n,j)}_{m,t} a_{m,t}^\top`: such
layers (found by a probe column) get one backward column per loss sample and factor
column, and these pullbacks are squared
(:func:`curvops.kronecker.rotated_pullback_squares`), so :math:`\Lambda` is again exactly
the diagonal of the curvature block (before, the per-layer-sample squares were 66 % off
and the trace 0.33 instead of 0.57 on a small BatchNorm MLP), for ``"type2"``,
``"empirical"`` and ``"mc"`` alike, at :math:`N_b` times the columns (over
:data:`curvops.kronecker.MAX_FACTOR_COLUMNS` per batch a ``ValueError`` names
``bn_mode``); the eigenbasis is that of K-FAC's factors (:class:`curvops.KFACOperator`,
whose :math:`G` is computed the same way).  A block parameter used outside its layer's
forward is refused as in K-FAC (``ValueError`` naming ``model``), and so are padded
batches (``ValueError`` naming ``data``, :func:`curvops.kronecker.refuse_padding`): their
positions enter K-FAC's input factor and so the eigenbasis; padding that the batch does
not name (a mask the model builds from pad ids) is counted, so do not pad batches for
E-KFAC.  Among all matrices with this eigenbasis it is the closest to the curvature
block in Frobenius norm.  Building it
costs two passes over ``data`` (the factors, then :math:`\Lambda`).
Eigenvalues, trace, log-det and the damped inverse :math:`1/(\Lambda + \delta)` are exact;
eigenvalues within :math:`(d_G + d_A)\,\varepsilon\max|\Lambda|` of zero in their block are
exactly 0 (as K-FAC's, :meth:`curvops.KFACOperator.eigenvalues`), so a singular E-KFAC has
``logdet() == -inf`` and ``inverse(0.0)`` raises a ``ValueError`` naming ``damping``.

>>> import torch
>>> net = torch.nn.Linear(3, 2).double()
>>> x, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
>>> E = EKFACOperator(net, torch.nn.MSELoss(), (x, y), bias="joint")
>>> from curvops.testing import dense_ggn
>>> exact = torch.linalg.eigvalsh(dense_ggn(net, torch.nn.MSELoss(), (x, y)))
>>> bool(torch.allclose(E.eigenvalues(), exact, atol=1e-12))
True
"""

from __future__ import annotations

from typing import Any

import torch

from curvops.distributed import resolve_group
from curvops.kfac import EigenBlock, KFACOperator, all_reduce_sums
from curvops.kronecker import (
    LayerRecord,
    record_grads,
    record_inputs,
    rotated_gradient_squares,
    rotated_pullback_squares,
    zero_rounding,
)
from spectral.errors import NumericalError

__all__ = ["EKFACOperator"]


class EKFACOperator(KFACOperator):
    """E-KFAC approximation of the GGN / Fisher of the mean loss over ``data``.

    The arguments are those of :class:`curvops.KFACOperator`; ``approx`` chooses the
    K-FAC factors whose eigenbases are kept.  :meth:`factors` returns those K-FAC
    factors; products, :meth:`eigenvalues`, :meth:`trace`, :meth:`logdet` and
    :meth:`inverse` use the corrected eigenvalues (``pi_damping`` is refused).  A
    bfloat16/float16 model gives an operator in its dtype whose eigenbases and corrected
    eigenvalues are computed in float32 from the model's inputs and gradient columns
    (widened), as K-FAC's factors (see :mod:`curvops.kfac`, "Low precision"); products
    are applied in float32 and rounded once to the operator's dtype.  A change of a
    selected parameter's dtype, device or shape after construction is refused as in
    K-FAC (``ValueError`` naming ``model``).

    Attributes
    ----------
    chunk_size:
        Samples per chunk of the per-sample products (memory ``chunk_size * d_G * d_A``).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> E = EKFACOperator(net, loss, (x, y))
    >>> E.shape, round(float(E.trace()), 10) == round(float(E.eigenvalues().sum()), 10)
    ((26, 26), True)
    """

    chunk_size = 64
    supports_pi_damping = False
    _needs_eigen = True

    def _compute(self) -> dict[str, Any]:
        stats = super()._compute()
        bases = [(e.U_G, e.U_A) for e in self._kfac_eigen(stats)]
        shapes = [(block.rows, block.cols) for block in self._blocks]
        group = resolve_group(self.process_group)
        error: Exception | None = None
        try:
            sums, count = self._local_square_sums(bases)
        except Exception as exc:  # with a group: still join the reduction, every rank stops
            if group is None:
                raise
            sums, count, error = [None] * len(self._blocks), 0, exc
        sums, total_count = all_reduce_sums(  # over the shards of a process group, if any
            sums, shapes, count, group, dtype=self._statistics_dtype, device=self.device,
            error=error, where=f"{type(self).__name__}'s eigenvalues",
        )  # fmt: skip
        eigen = []
        for i, block in enumerate(self._blocks):
            total = sums[i]
            if total is None:  # pragma: no cover - _compute_factors refuses unseen layers
                raise NumericalError(f"E-KFAC: no data reached layer {block.layer!r}")
            values = total / self._batch_factor_weight(total_count)
            if not bool(torch.isfinite(values).all()):
                raise NumericalError(f"E-KFAC: non-finite eigenvalues of layer {block.layer!r}")
            U_G, U_A = bases[i]
            # exact zeros (directions in a factor's null space) come out as squares of
            # rounding noise, 1e-36 and up: 0 within (d_G + d_A) eps max|Lambda|, as K-FAC's
            values = zero_rounding(values, block.rows + block.cols)
            eigen.append(EigenBlock(U_G, U_A, values))
        stats["eigen"] = eigen
        return stats

    def _local_square_sums(
        self, bases: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor | None], int]:
        """This process's sums of rotated squared gradients per block, and its sample count."""
        sums: list[torch.Tensor | None] = [None] * len(self._blocks)
        count = 0
        # type-2: one column per loss position and class, so that the squared per-sample
        # gradients sum to the exact curvature (no cross-position terms); the probe column
        # finds the layers whose samples are coupled (train-mode BatchNorm after them)
        per_position = self.fisher == "type2"
        for batch, records in self._passes(per_position=per_position, probe_coupling=True):
            count += batch.size
            weight = self._batch_factor_weight(batch.size)
            for record in records:
                if not record.coupled:
                    self._add_squares(sums, bases, record, weight)
            coupled = [record for record in records if record.coupled]
            for record in self._pullback_records(batch, coupled, per_position=per_position):
                self._add_squares(sums, bases, record, weight)
        return sums, count

    def _add_squares(
        self,
        sums: list[torch.Tensor | None],
        bases: list[tuple[torch.Tensor, torch.Tensor]],
        record: LayerRecord,
        weight: float,
    ) -> None:
        """Add a record's rotated squared gradients (x ``weight``) to its blocks' ``sums``.

        Per layer sample (:func:`curvops.kronecker.rotated_gradient_squares`), or per
        column summed over all samples when each column is one loss sample's pullback
        (``record.pullbacks``, :func:`curvops.kronecker.rotated_pullback_squares`).
        In :attr:`_statistics_dtype`, as the factors: a bfloat16/float16 model's input
        rows and gradient columns are widened to float32 (the eigenbases' dtype) and
        rotated, squared and summed in float32.
        """
        wide = self._statistics_dtype
        a = record_inputs(record).to(wide)
        for i, block in enumerate(self._blocks):
            if block.module is not record.module:
                continue
            U_G, U_A = bases[i]
            rows = self._block_inputs(block, a)
            if record.pullbacks:  # (the columns of a group of samples, within a budget)
                grads = [record_grads(record, g).to(wide) for g in record.grads]
                term = rotated_pullback_squares(rows, grads, U_A, U_G, chunk_size=self.chunk_size)
            else:  # one column's rows at a time, as before
                term = rows.new_zeros(U_G.shape[1], U_A.shape[1])
                for g in record.grads:
                    rows_g = record_grads(record, g).to(wide)
                    term += rotated_gradient_squares(
                        rows, rows_g, U_A, U_G, chunk_size=self.chunk_size
                    )
            term = term * weight
            current = sums[i]
            sums[i] = term if current is None else current + term

    def _eigen(self) -> list[EigenBlock]:
        eigen: list[EigenBlock] = self._statistics()["eigen"]
        return eigen

    def _block_products(self) -> Any:
        return super(KFACOperator, self)._block_products()

    def _dense_blocks(self) -> list[torch.Tensor]:
        return super(KFACOperator, self)._dense_blocks()

    def trace(self) -> float:
        """:math:`\\sum \\Lambda` (+ the remainder's trace)."""
        total = sum(float(e.values.sum()) for e in self._eigen())
        return total + float(self.remainder_diagonal().sum())

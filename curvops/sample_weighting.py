r"""Does a plain-function loss combine batches as a mean over its samples?

An operator over several batches (a list, a DataLoader, shards across processes) is the
curvature of the mean loss over everything the loss counts: batch :math:`b` enters with
weight :math:`\nu_b / \sum_c \nu_c`, where :math:`\nu_b` is the loss's own normaliser.  For
a loss whose normaliser is not known (:func:`curvops.losses.normaliser_is_known`: a plain
function, an unrecognised module) the library takes :math:`\nu_b = N_b`, the samples,
which is exact when the loss is a mean of per-sample losses.  Then, for outputs and
targets of batches :math:`B_1, \dots, B_m` concatenated along their first dimension,

.. math::

    L(B_1 \cup \dots \cup B_m) = \frac{\sum_i N_i\, L(B_i)}{\sum_i N_i},

and a loss that sums (``reduction="sum"`` inside a function), averages over counted
tokens, weights by class, or couples its samples (in-batch negatives) breaks it: a sum
inside a lambda over batches of 1, 7 and 8 samples gave a Hessian 52 % off, class
weights with a balanced first batch 19 %, all silently.  :func:`check_sample_weighting`
evaluates that identity on the already computed outputs (the model does not run again)
and refuses a loss that breaks it, naming :func:`curvops.losses.declare_loss`.
:class:`SampleWeightingProbe` applies it to every batch against the first one (a
loader: one pass without gradients), to the minibatches ``loss_stats`` cuts from the
first batch, or, with a single batch per process, to the first batch's two halves; the
processes' first batches are compared with each other too
(``curvops.validation.validate_across_ranks``).

>>> out, y = torch.arange(4.0).reshape(4, 1), torch.zeros(4, 1)
>>> check_sample_weighting(lambda f, t: ((f - t) ** 2).mean(), halves(out, y, 4), "batch 0")
True
>>> check_sample_weighting(lambda f, t: ((f - t) ** 2).sum(), halves(out, y, 4), "batch 0")
Traceback (most recent call last):
...
ValueError: Argument 'loss_fn': expected a loss normalised by its number of samples...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from spectral.errors import argument_error

__all__ = ["Part", "SampleWeightingProbe", "check_sample_weighting", "halves", "pieces"]

#: The outputs, targets and number of samples of a batch (or of a part of one).
Part = tuple[torch.Tensor, torch.Tensor, int]

_DECLARE = (
    "declare how it normalises with curvops.losses.declare_loss(loss_fn, normaliser="
    "'targets' | 'samples' | callable) or declare_loss(loss_fn, reduction='sum'), so "
    "batches combine exactly (normaliser='samples' accepts a loss coupling its samples, as "
    "the sample-weighted mean of the batch losses)"
)


def _cut(outputs: Any, targets: Any, samples: int, starts: Sequence[int]) -> list[Part] | None:
    """The parts of the samples beginning at ``starts`` (ascending, from 0), outputs and
    targets cut in proportion to their leading dimensions; ``None`` when they cannot be
    cut so (not tensors, leading sizes not multiples of ``samples``, fewer than 2 parts)."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    if len(starts) < 2 or outputs.dim() == 0 or targets.dim() == 0:
        return None
    m, t = int(outputs.shape[0]), int(targets.shape[0])
    if m % samples or t % samples or not outputs.is_floating_point():
        return None
    per_o, per_t = m // samples, t // samples
    ends = [*starts[1:], samples]
    return [
        (outputs[a * per_o : b * per_o], targets[a * per_t : b * per_t], b - a)
        for a, b in zip(starts, ends)
    ]


def halves(outputs: Any, targets: Any, samples: int) -> list[Part] | None:
    """The first :math:`\\lfloor n/2 \\rfloor` of ``samples`` = :math:`n` and the rest, as two
    parts; outputs and targets are cut in proportion to their leading dimensions (a
    ``[N T, V]`` output of ``[N, T]`` targets is cut at token ``k T``).  ``None`` when they
    cannot be cut so (fewer than 2 samples, leading sizes not multiples of ``samples``).

    >>> [tuple(p[0].shape) for p in halves(torch.zeros(6, 2), torch.zeros(3), 3)]
    [(2, 2), (4, 2)]
    """
    return _cut(outputs, targets, samples, [0, samples // 2] if samples >= 2 else [0])


def pieces(outputs: Any, targets: Any, samples: int, size: int) -> list[Part] | None:
    """Consecutive pieces of ``size`` samples (the last may be smaller), cut as by
    :func:`halves`; ``None`` when they cannot be cut so or there is only one.

    >>> [p[2] for p in pieces(torch.zeros(5, 2), torch.zeros(5), 5, 2)]
    [2, 2, 1]
    """
    return _cut(outputs, targets, samples, list(range(0, samples, size)))


def _values(loss_fn: Any, parts: Sequence[Part]) -> torch.Tensor | None:
    """``[L(concatenation), L(part_1), ...]`` in the dtype the loss returns, ``None`` when
    the parts cannot be concatenated or the loss fails on one (nothing learnt)."""
    try:
        whole = (
            torch.cat([p[0].detach() for p in parts]),
            torch.cat([p[1] for p in parts]),
        )
        with torch.no_grad():
            values = [loss_fn(o, t) for o, t in (whole, *((p[0].detach(), p[1]) for p in parts))]
    except Exception:
        return None
    if not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
        return None
    dtype = values[0].dtype if values[0].is_floating_point() else torch.float64
    return torch.stack([v.detach().reshape(()).to(dtype) for v in values])


def check_sample_weighting(loss_fn: Any, parts: Sequence[Part], where: str) -> bool:
    """Refuse ``loss_fn`` if its value on the concatenated ``parts`` is not the
    sample-weighted mean of its values on each (see the module docstring).

    The tolerance, relative to the largest of the values, is
    :math:`\\min(0.25, \\max(10^{-8}, 10^3 \\sqrt{N} \\varepsilon))`, :math:`N` the samples in
    all parts and :math:`\\varepsilon` that of the dtype the loss returns (a loss computed in
    float32 or bfloat16 from float64 outputs is judged at its own precision): rounding of
    a mean of :math:`N` terms grows like :math:`\\sqrt{N}\\varepsilon`, and the margin of
    :math:`10^3` (:math:`10^{-8}` in float64) leaves room for per-sample losses of both
    signs much larger than their mean.  A wrong normaliser differs by far more: a sum
    against a mean by half its value, so it is found in every dtype.

    Parameters
    ----------
    loss_fn : callable
        The loss, ``(outputs, targets) -> scalar``.
    parts : sequence of (outputs, targets, samples)
        Batches or parts of one (:func:`halves`).
    where : str
        Names the batches in the message (e.g. ``"batches 0 and 3"``).

    Returns
    -------
    bool
        Whether anything was learnt (``False``: the loss fails on a part or on their
        concatenation, or every value is 0).

    Raises
    ------
    ValueError
        Naming ``loss_fn``, the values and :func:`curvops.losses.declare_loss`; also for a
        loss that is not finite on a part while finite on the whole.
    """
    values = _values(loss_fn, parts)
    if values is None:
        return False
    sizes = [p[2] for p in parts]
    floats = [float(v) for v in values]
    if all(math.isfinite(v) for v in floats):
        whole, each = floats[0], floats[1:]
        expected = sum(n * v for n, v in zip(sizes, each)) / sum(sizes)
        scale = max(abs(v) for v in floats)
        if scale == 0.0:
            return False
        eps = float(torch.finfo(values.dtype).eps)
        error = abs(whole - expected) / scale
        if error <= min(0.25, max(1e-8, 1e3 * math.sqrt(sum(sizes)) * eps)):
            return True
        found = (
            f"{whole:.10g} on {where} together, but {', '.join(f'{v:.10g}' for v in each)} "
            f"on each ({' and '.join(str(n) for n in sizes)} samples): a mean over samples "
            f"would give {expected:.10g} (relative difference {error:.2g}), a sum "
            f"{sum(each):.10g}"
        )
    else:
        found = f"values {floats} on {where} together and on each (not finite)"
    raise argument_error(
        "loss_fn",
        "a loss normalised by its number of samples, which combining batches assumes for a "
        f"plain function; {_DECLARE}",
        found,
    )


class SampleWeightingProbe:
    """:func:`check_sample_weighting` of every batch against the first (see the module).

    Parameters
    ----------
    loss_fn : callable
        The loss (its normaliser not known).
    first : Part
        The first batch's outputs, targets and samples.
    index : int
        The first batch's index.

    >>> probe = SampleWeightingProbe(torch.nn.functional.mse_loss,
    ...                              (torch.ones(2, 1), torch.zeros(2, 1), 2), 0)
    >>> probe.compare((torch.zeros(3, 1), torch.zeros(3, 1), 3), 1)
    >>> probe.compared
    True
    """

    def __init__(
        self, loss_fn: Any, first: Part, index: int, minibatch_size: int | None = None
    ) -> None:
        self.loss_fn = loss_fn
        self.first = first
        self.index = index
        self.minibatch_size = minibatch_size
        self.compared = False

    def compare(self, other: Part, index: int) -> None:
        """Check batch ``index`` (its outputs, targets and samples) against the first; its
        targets are moved to the first's device and (floating) dtype, as the first's were."""
        from curvops.data import move_to

        reference = self.first[1]
        dtype = reference.dtype if reference.is_floating_point() else None
        targets = move_to(other[1], reference.device, dtype)
        where = f"batches {self.index} and {index}"
        if check_sample_weighting(self.loss_fn, [self.first, (other[0], targets, other[2])], where):
            self.compared = True

    def finish(self) -> None:
        """The first batch's minibatches of ``minibatch_size`` samples (``loss_stats`` cuts
        them from every batch), each against the first; else, without another batch to
        compare with (one batch per process, one that cannot be concatenated with the
        first), the first batch's two halves."""
        if self.minibatch_size is not None:
            parts = pieces(*self.first, self.minibatch_size) or []
            for j, part in enumerate(parts[1:], start=1):
                where = f"minibatches 0 and {j} of batch {self.index}"
                check_sample_weighting(self.loss_fn, [parts[0], part], where)
        elif not self.compared:
            two = halves(*self.first)
            if two is not None:
                check_sample_weighting(self.loss_fn, two, f"the halves of batch {self.index}")

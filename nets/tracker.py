r"""Curvature during training: :class:`CurvatureTracker`, for any training loop.

Every ``every`` optimiser steps the tracker measures, on a fixed measurement set,
the ``top_k`` largest eigenvalues of the curvature matrix (Hessian, GGN or Fisher,
as :mod:`curvops` operators), optionally its trace (Hutchinson) and a spectral
density snapshot (stochastic Lanczos quadrature), and appends one row per
measurement to :attr:`CurvatureTracker.rows` and to a JSON-lines file::

    tracker = CurvatureTracker(model, loss_fn, data, every=50, top_k=3, trace_probes=8,
                               path="run/curvature.jsonl")
    for x, y in loader:
        ...; optimizer.step()
        tracker.step()          # counts optimiser steps; measures every `every`-th

**Eigenvalues.**  :func:`spectral.blockeig.block_eigenpairs` with residual tolerance
``tol``: every reported :math:`\theta_i` comes with its residual
:math:`\|A y_i - \theta_i y_i\| \le \mathrm{tol}\cdot|\theta_i|` (or the rounding
floor), and an eigenvalue of :math:`A` lies within that residual of
:math:`\theta_i`.  **Warm start**: the Ritz vectors of the previous measurement
start the next eigen-solve, so while the model moves slowly a measurement costs a
fraction of a cold one (``products`` in each row; ``warm`` says which it was).

**Nothing of the run changes.**  The operators leave parameters, buffers, modes,
``requires_grad`` and ``.grad`` bit-identical (curvops contract 3); the tracker never
touches the optimiser; the global RNG streams (torch, CUDA when initialised, numpy,
Python ``random``) are saved before and restored after each measurement and the
one pass over a DataLoader ``data`` (the loader's and its sampler's generators too).
A DataLoader is read once, at construction, into a list of batches, and in-memory
batches are copied then: the measurement set is the same at every step, whatever the
loop later does to its own tensors (a reused input buffer).

**File and restart.**  Rows go to ``path`` as JSON lines, the whole file rewritten
through :func:`spectral.io.atomic_write` (temporary file, fsync, rename) after each
measurement: a reader or a restarted process sees the file before or after a row,
never a torn line (the file is small: one short line per measurement).  Each row
carries a CRC-32 (:mod:`nets.curvature_rows`), verified when the file is read back, so a
changed byte is an error naming the line, not a different measurement.  The warm
start vectors of the last few measurements go beside it (``<path>.ritz.npz``).
A tracker built on an existing file continues it: its step count is the last row's
step, or ``start_step`` (the step of the training checkpoint the run resumed from),
in which case rows after ``start_step`` are dropped and measured again, so the file
has no duplicate and no missing step; the Ritz vectors and density snapshots of the dropped
rows (a branch the restart abandons) are discarded with them.  Density snapshots go to
``<stem>.density-<step>.npz`` (:meth:`spectral.SpectralDensity.save`).

**Probes.**  The trace and density probes of a measurement come from generators of their
own, functions of ``(seed, step)`` and the estimate only, so a warm or a cold eigen-solve
before them (which draw different numbers of random vectors) cannot change them: a run
restarted without its warm-start vectors gives the rows of the uninterrupted run.
(Before, they shared the eigen-solves' stream, and a branch resumed cold gave another
trace estimate, e.g. 6.09 instead of 23.88.)  Files written before this change are
continued as they are: their rows' ``trace`` and ``density`` are estimates of the same
quantities from other probes, and the new rows' estimates are not the ones the older
version would have drawn.

**Diverged training.**  A measurement of a model with NaN or Inf parameters is refused
with a :class:`spectral.errors.NumericalError` naming the step (and epoch): training
produced them.

>>> import torch
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> nn = torch.nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
>>> batch = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
>>> tracker = CurvatureTracker(net, torch.nn.MSELoss(), batch, every=2, top_k=2, seed=0)
>>> for _ in range(4):
...     row = tracker.step()
>>> [r["step"] for r in tracker.rows], len(tracker.rows[-1]["top_eigenvalues"])
([2, 4], 2)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from curvops.blocks import ParamSlice
from curvops.curvature import ModelCurvatureOperator
from curvops.data import as_data
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.params import group_by_layer, select_params
from nets.curvature_rows import read_rows, write_rows
from nets.measurement_settings import measurement_settings, settings_difference
from spectral.blockeig import block_eigenpairs
from spectral.errors import NumericalError, argument_error
from spectral.estimators import trace
from spectral.io import CorruptFileError, load_npz, save_npz
from spectral.quadrature import slq

__all__ = ["KINDS", "CurvatureTracker"]

logger = logging.getLogger(__name__)

KINDS: Mapping[str, type[ModelCurvatureOperator]] = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": FisherOperator,
}


@contextlib.contextmanager
def preserved_rng(*generators: torch.Generator | None) -> Iterator[None]:
    """Restore the global RNG streams (torch, CUDA, numpy, Python) and ``generators`` on exit.

    >>> before = torch.get_rng_state()
    >>> with preserved_rng():
    ...     _ = torch.rand(3)
    >>> bool(torch.equal(before, torch.get_rng_state()))
    True
    """
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()  # noqa: NPY002 (saved, never drawn from)
    python_state = random.getstate()
    own = [(g, g.get_state()) for g in generators if g is not None]
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
        for g, state in own:
            g.set_state(state)


def _fixed_batches(data: Any) -> Any:
    """``data`` as a fixed in-memory measurement set (a DataLoader is read once)."""
    stream = as_data(data)
    if stream.is_in_memory:  # copied: later in-place edits of the caller's tensors change nothing
        return _snapshot(data)
    generators = [getattr(data, "generator", None)]
    sampler = getattr(data, "sampler", None)
    generators.append(getattr(sampler, "generator", None))
    with preserved_rng(*generators):
        return [(b.inputs, b.targets) for b in stream]


def _snapshot(data: Any) -> Any:
    """``data`` with every tensor detached and cloned (containers rebuilt as their type)."""
    if isinstance(data, torch.Tensor):
        return data.detach().clone()
    if isinstance(data, list | tuple):
        items = [_snapshot(d) for d in data]
        return type(data)(*items) if hasattr(data, "_fields") else type(data)(items)
    if isinstance(data, Mapping):
        copied = {k: _snapshot(v) for k, v in data.items()}
        try:
            return cast(Any, type(data))(copied)
        except TypeError:
            return copied
    return copy.deepcopy(data)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise argument_error(name, f"an integer >= {minimum}", value)
    return int(value)


def _blocks(model: nn.Module, params: Any, blocks: Any) -> dict[str, list[str]]:
    """Named parameter groups: ``"layer"`` (one per module) or a mapping name -> selection."""
    if blocks is None:
        return {}
    if blocks == "layer":
        groups = group_by_layer(select_params(model, params))
        return {g[0][0].rpartition(".")[0] or "<root>": [n for n, _ in g] for g in groups}
    if isinstance(blocks, Mapping) and blocks:
        _check_block_labels(blocks)
        return {str(k): [n for n, _ in select_params(model, _whole(v))] for k, v in blocks.items()}
    raise argument_error("blocks", "None, 'layer' or a non-empty mapping name -> params", blocks)


def _check_block_labels(blocks: Mapping[Any, Any]) -> None:
    """Refuse labels that are empty or equal after ``str()``: a block is stored and reported
    under ``str(label)``, and ``""`` is the whole-selection measurement."""
    seen: dict[str, Any] = {}
    for key in blocks:
        label = str(key)
        if not label:
            raise argument_error(
                "blocks",
                "non-empty block names (the empty name is the whole selection's measurement)",
                key,
            )
        if label in seen:
            raise argument_error(
                "blocks",
                "block names distinct after str() (rows key the blocks by str(name)); "
                f"two are {label!r}",
                [seen[label], key],
            )
        seen[label] = key


def _whole(selection: Any) -> Any:
    """A block's selection with whole-parameter :class:`curvops.blocks.ParamSlice` entries as
    names; slices of a parameter (heads, fused q/k/v parts) are refused naming ``blocks``."""
    if not isinstance(selection, list | tuple) or not any(
        isinstance(s, ParamSlice) for s in selection
    ):
        return selection
    if any(isinstance(s, ParamSlice) and s.index is not None for s in selection):
        raise argument_error(
            "blocks",
            "a mapping name -> whole parameters (names, modules or ParamSlice with index=None): "
            "the tracker's operators cannot select part of a parameter (a head or one of fused "
            "q/k/v); use curvops.per_block for per-head blocks",
            selection,
        )
    return [s.name if isinstance(s, ParamSlice) else s for s in selection]


def _checked_lr(lr: Any) -> float:
    """``lr`` as a float: finite and non-negative (a row's ``lr`` draws the 2/lr line of
    :func:`nets.plots.plot_tracking`; ``nan`` was written and drew nothing).

    >>> _checked_lr(0.05)
    0.05
    """
    try:
        value = float(lr)
    except (TypeError, ValueError) as exc:
        raise argument_error("lr", "a learning rate (a number)", lr, kind=TypeError) from exc
    if not (math.isfinite(value) and value >= 0.0):
        raise argument_error("lr", "a finite learning rate >= 0", lr)
    return value


def _check_no_gap(
    previous: int, step: int, settings: Mapping[str, Any], number: int, source: Path
) -> None:
    """Refuse two neighbouring rows with a due measurement between them.

    :meth:`CurvatureTracker.step` measures at every multiple of ``every`` (a failed
    measurement is retried, never skipped), so a multiple of the rows' ``every`` strictly
    between two neighbouring rows means a deleted row (each row's own checksum cannot
    tell).

    >>> _check_no_gap(4, 6, {"every": 2}, 3, Path("f.jsonl"))
    >>> _check_no_gap(2, 6, {"every": 2}, 2, Path("f.jsonl"))
    Traceback (most recent call last):
    ...
    spectral.io.CorruptFileError: File 'f.jsonl', line 2: step 6 after step 2, but rows are ...
    """
    every = settings.get("every")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        return
    due = (previous // every + 1) * every
    if due < step:
        raise CorruptFileError(
            f"File '{source}', line {number}: step {step} after step {previous}, but rows "
            f"are measured every {every} steps: the row of step {due} is missing (a line "
            "was deleted)."
        )


def _rows_path(path: Any) -> Path | None:
    """``path`` as the rows file: ``None``, or a path that is not a directory (or other
    non-file), refused here rather than at the first measurement's write."""
    if path is None:
        return None
    if not isinstance(path, str | os.PathLike):
        raise argument_error("path", "None or a file path", path, kind=TypeError)
    rows = Path(path)
    if rows.exists() and not rows.is_file():
        what = "a directory" if rows.is_dir() else "not a regular file"
        raise argument_error(
            "path",
            "a file for the rows (a new or an existing JSON-lines file)",
            f"'{rows}', {what}",
        )
    return rows


#: The operator arguments the tracker sets itself.
_OWN_OPERATOR_ARGUMENTS = frozenset({"model", "loss_fn", "data", "params", "bn_mode"})


def _operator_kwargs(cls: type[ModelCurvatureOperator], given: Any) -> dict[str, Any]:
    """``operator_kwargs`` checked against the keyword arguments of the operator class."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise argument_error(
            "operator_kwargs", f"a mapping of keyword arguments of {cls.__name__}", given,
            kind=TypeError,
        )  # fmt: skip
    parameters = inspect.signature(cls).parameters
    accepted = sorted(set(parameters) - _OWN_OPERATOR_ARGUMENTS)
    unknown = sorted(str(key) for key in given if key not in accepted)
    if unknown:
        raise argument_error(
            "operator_kwargs",
            f"keyword arguments of {cls.__name__} among {accepted} (the tracker sets "
            f"{sorted(_OWN_OPERATOR_ARGUMENTS)} itself)",
            f"unknown keys {unknown}",
        )
    return dict(given)


def _operators(
    cls: type[ModelCurvatureOperator],
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Any,
    blocks: Any,
    bn_mode: str | None,
    kwargs: dict[str, Any],
) -> dict[str, _Counted]:
    """The counted operators: ``""`` for the whole selection, one per block."""
    operators = {"": _Counted(cls(model, loss_fn, data, params=params, bn_mode=bn_mode, **kwargs))}
    for name, names in _blocks(model, params, blocks).items():
        op = cls(model, loss_fn, data, params=names, bn_mode=bn_mode, **kwargs)
        operators[name] = _Counted(op)
    return operators


def products_dtype(op: ModelCurvatureOperator) -> torch.dtype:
    """The dtype the operator's products are computed in now: the parameters' dtype, or the
    ``torch.autocast`` dtype when autocast is on for the operator's device and lowers it
    (autocast leaves float64 alone)."""
    dtype = op.torch_dtype
    kind = op.device.type
    if dtype == torch.float64 or not torch.is_autocast_enabled(kind):
        return dtype
    low = torch.get_autocast_dtype(kind)
    return low if torch.finfo(low).eps > torch.finfo(dtype).eps else dtype


def check_attainable_tol(tol: float, op: ModelCurvatureOperator) -> None:
    """Refuse a ``tol`` below the floor under which :func:`spectral.blockeig.block_eigenpairs`
    cannot certify a residual (it would silently raise ``tol`` to it): ``100 eps`` of the
    products' precision, or ``2 eps`` for 16-bit products, whose rounding of input and
    result limits every residual to about ``eps`` (:func:`spectral.eigen.residual_floor`;
    the floor of a product computed in bfloat16 under ``torch.autocast`` too, which that
    function cannot see)."""
    dtype = products_dtype(op)
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    floor = (2.0 if sixteen_bit else 100.0) * torch.finfo(dtype).eps
    if tol < floor:
        where = " under torch.autocast" if dtype != op.torch_dtype else ""
        raise argument_error(
            "tol",
            f"at least {floor:.3g} ({'2' if sixteen_bit else '100'} eps) for curvature products "
            f"computed in {dtype}{where}: no smaller relative residual can be certified in "
            "that precision; measure a float32 or float64 copy of the model (and call the "
            "tracker outside torch.autocast) for a tighter tolerance",
            tol,
        )


#: The streams of a measurement's trace and density probes (beside the eigen-solves').
_TRACE_STREAM, _DENSITY_STREAM = 1, 2


def _probe_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    """The generator of one estimate's probes at ``step``: a function of ``(seed, step,
    stream)`` only, so a warm or cold eigen-solve before it (which draws a different number
    of random vectors) cannot change the estimate.

    >>> a = _probe_rng(0, 5, _TRACE_STREAM).standard_normal(2)
    >>> bool((a == _probe_rng(0, 5, _TRACE_STREAM).standard_normal(2)).all())
    True
    """
    return np.random.default_rng([seed, step, stream])


def _check_finite_parameters(op: ModelCurvatureOperator, step: int, epoch: int | None) -> None:
    """Refuse to measure a model with NaN/Inf parameters (``NumericalError`` naming the step):
    training diverged, which the operator's error ("non-finite values in parameter(s)")
    did not say."""
    bad = [
        name
        for name, p in zip(op.param_names, op.current_params(), strict=True)
        if not bool(torch.isfinite(p.detach()).all())
    ]
    if bad:
        at = f"step {step}" + ("" if epoch is None else f" (epoch {epoch})")
        raise NumericalError(
            f"CurvatureTracker: the model's parameters are non-finite at {at}, in "
            f"{bad[:5]}: training produced them (it diverged; lower the learning rate or "
            "check the data); nothing was measured."
        )


class _Counted:
    """A curvature operator that counts its products (columns)."""

    def __init__(self, op: ModelCurvatureOperator) -> None:
        self.op = op
        self.shape = op.shape
        self.dtype = op.dtype
        self.symmetric = True
        self.count = 0

    def template_vector(self) -> torch.Tensor:
        return self.op.template_vector()

    def matvec(self, x: Any) -> Any:
        self.count += 1
        return self.op.matvec(x)

    def matmat(self, X: Any) -> Any:
        self.count += int(X.shape[1])
        return self.op.matmat(X)


class CurvatureTracker:
    """Measure the top of the curvature spectrum every ``every`` optimiser steps.

    The Ritz vectors of the last :attr:`KEEP_VECTORS` measurements are kept in
    ``<path>.ritz.npz``, so a restart from a checkpoint up to that many measurements
    back continues warm, with rows identical to an uninterrupted run (but ``seconds``).

    Parameters
    ----------
    model, loss_fn:
        The trained model and its loss (``reduction="mean"``).  The loss's full
        configuration (:func:`nets.measurement_settings.describe_loss`) is recorded in
        each row: a file is continued only with the same loss.
    data:
        The measurement set: one ``(inputs, targets)`` batch, a list of batches or a
        DataLoader (read once at construction; the same samples at every measurement).
    every:
        Measure when the step count is a multiple of ``every`` (>= 1).
    top_k:
        Number of largest eigenvalues (>= 1).
    trace_probes:
        Hutchinson probes for the trace (0: no trace); rows then hold ``trace`` and
        ``trace_stderr`` (the standard error of the probe mean, NaN for one probe).
    kind:
        ``"hessian"``, ``"ggn"`` or ``"fisher"`` (Monte-Carlo Fisher with ``seed``).
    params:
        Parameter selection as in the operators (default all trainable).
    blocks:
        ``None``, ``"layer"`` (one block per module) or a mapping ``name -> params``:
        rows then also hold ``blocks[str(name)]`` with that block's top eigenvalues.
        Names must be non-empty and distinct after ``str()`` (``1`` and ``"1"`` are
        refused together).
    bn_mode:
        Passed to the operators (``None``: each module's current mode; ``"train"``
        uses batch statistics and leaves the running statistics untouched).
    seed:
        Seeds the random start and guard vectors, trace probes and SLQ probes
        (per measurement, from ``(seed, step)``; the probes from streams of their own).
    tol:
        Relative residual tolerance of the eigenvalues (see the module docstring): each
        value is within ``tol * |value|`` of an eigenvalue, and in practice within about
        ``(tol * |value|)**2 / gap``.  At least ``100 eps`` of the precision the products
        are computed in (the model's dtype, or the ``torch.autocast`` dtype when a
        measurement runs under autocast): a smaller ``tol`` cannot be certified there and
        is refused (``ValueError`` naming ``tol``), never silently loosened.
    warm_start:
        Start each eigen-solve from the ``min(2 top_k, n)`` most wanted Ritz vectors of the
        previous measurement (``n`` the block's parameter count; plus one random guard
        vector); ``True`` or ``False``.
    density_every, density_iters, density_probes:
        Save an SLQ density (``density_iters`` Lanczos steps, ``density_probes`` probes)
        at measurements whose step is a multiple of ``density_every`` (a multiple of ``every``).
    path:
        JSON-lines file of the rows (``None``: rows only in memory); not a directory.
    start_step:
        Step count to continue from after a restart (default: the last row's step in
        ``path``, or 0); rows after it are dropped from the file and measured again.
    optimizer:
        Optional; its first parameter group's ``lr`` goes into each row.
    operator_kwargs:
        Extra keyword arguments of the operator class (e.g. ``{"kind": "empirical"}``);
        a key the class does not take is refused here.

    Raises
    ------
    ValueError, TypeError
        Bad arguments (named in the message).
    spectral.io.CorruptFileError
        ``path`` exists and a line is not a JSON row, or its steps do not increase.
    spectral.errors.NumericalError
        From :meth:`step` or :meth:`measure`: the model's parameters are not finite.
    ValueError
        ``path`` holds rows of another ``kind`` or ``top_k``, or of another measurement
        (each row records its ``settings``: :mod:`nets.measurement_settings`; the error
        names the argument that differs and the file), or ``start_step`` is past a due
        measurement the file lacks, or ``path`` is a directory.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> tracker = CurvatureTracker(net, torch.nn.CrossEntropyLoss(), (x, torch.tensor([0, 1] * 4)),
    ...                            every=2, top_k=1)
    >>> rows = [tracker.step() for _ in range(4)]  # after each optimiser step
    >>> [row and row["step"] for row in rows], rows[-1]["warm"]
    ([None, 2, None, 4], True)
    """

    KEEP_VECTORS = 3

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 50,
        top_k: int = 3,
        trace_probes: int = 0,
        kind: str = "hessian",
        params: Any = None,
        blocks: Any = None,
        bn_mode: str | None = None,
        seed: int = 0,
        tol: float = 1e-4,
        warm_start: bool = True,
        density_every: int | None = None,
        density_iters: int = 40,
        density_probes: int = 2,
        path: str | os.PathLike[str] | None = None,
        start_step: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        operator_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.every = _check_int("every", every, 1)
        self.top_k = _check_int("top_k", top_k, 1)
        self.trace_probes = _check_int("trace_probes", trace_probes, 0)
        self.seed = _check_int("seed", seed, 0)
        if kind not in KINDS:
            raise argument_error("kind", f"one of {sorted(KINDS)}", kind)
        if not isinstance(tol, float | int) or not 0 < tol < 1:
            raise argument_error("tol", "a float in (0, 1)", tol)
        if density_every is not None:
            density_every = _check_int("density_every", density_every, 1)
            if density_every % self.every:
                raise argument_error(
                    "density_every", f"a multiple of every = {self.every}", density_every
                )
        if not isinstance(warm_start, bool | np.bool_):
            raise argument_error("warm_start", "True or False", warm_start, kind=TypeError)
        self.kind = kind
        self.tol = float(tol)
        self.warm_start = bool(warm_start)
        self.density_every = density_every
        self.density_iters = _check_int("density_iters", density_iters, 1)
        self.density_probes = _check_int("density_probes", density_probes, 1)
        self.optimizer = optimizer
        self.path = _rows_path(path)
        kwargs = _operator_kwargs(KINDS[kind], operator_kwargs)
        if kind == "fisher":
            kwargs.setdefault("seed", self.seed)
        data = _fixed_batches(data)
        self._operators = _operators(
            KINDS[kind], model, loss_fn, data, params, blocks, bn_mode, kwargs
        )
        main = self._operators[""].op
        shapes = [tuple(p.shape) for p in main.current_params()]
        self.settings = measurement_settings(
            every=self.every, trace_probes=self.trace_probes, tol=self.tol, seed=self.seed,
            bn_mode=bn_mode, density_every=density_every, loss_fn=loss_fn, model=model,
            density_iters=self.density_iters, density_probes=self.density_probes,
            parameters=list(zip(main.param_names, shapes)),
            blocks=[n for n in self._operators if n], operator_kwargs=kwargs, data=data,
        )  # fmt: skip
        check_attainable_tol(self.tol, main)
        for name, counted in self._operators.items():
            if self.top_k >= counted.shape[0]:
                raise argument_error(
                    "top_k",
                    f"fewer than the {counted.shape[0]} parameters of block {name!r}",
                    top_k,
                )
        self._vectors: dict[str, torch.Tensor] = {}
        self._history: dict[int, dict[str, np.ndarray]] = {}
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        if self.path is not None:
            self._resume(start_step)
        elif start_step is not None:
            self.count = _check_int("start_step", start_step, 0)

    # ------------------------------------------------------------------ the loop hook
    def step(
        self, *, epoch: int | None = None, lr: float | None = None, loss: float | None = None
    ) -> dict[str, Any] | None:
        """Count one optimiser step; measure (and return the row) when the count is due.

        A measurement that fails (an error from the eigen-solver, a full disk, an
        interrupt) leaves the count where it was, so the step can be retried: before, the
        step was counted anyway and its measurement silently lost.
        """
        if lr is not None:  # on every step, due or not
            _checked_lr(lr)
        if (self.count + 1) % self.every == 0:  # refused before counting: the step can be retried
            check_attainable_tol(self.tol, self._operators[""].op)
        self.count += 1
        if self.count % self.every or any(r["step"] == self.count for r in self.rows[-1:]):
            return None
        try:
            return self.measure(epoch=epoch, lr=lr, loss=loss)
        except BaseException:
            self.count -= 1
            raise

    def measure(
        self, *, epoch: int | None = None, lr: float | None = None, loss: float | None = None
    ) -> dict[str, Any]:
        """Measure now, at the current step count; append and return the row.

        At a step already measured (``step()`` measured it, or an earlier ``measure()``)
        the existing row is returned: nothing is measured or written again, so the file
        keeps one row per step.
        """
        if self.rows and self.rows[-1]["step"] == self.count:
            return self.rows[-1]
        if lr is not None:
            _checked_lr(lr)
        _check_finite_parameters(self._operators[""].op, self.count, epoch)
        start = time.perf_counter()
        with preserved_rng():
            row = self._measure()
        row["seconds"] = time.perf_counter() - start
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        extras = {"epoch": epoch, "lr": None if lr is None else float(lr), "loss": loss}
        row.update({k: v for k, v in extras.items() if v is not None})
        self.rows.append(row)
        if self.path is not None:
            try:
                self._write()
            except BaseException:
                self.rows.pop()  # not in the file: not measured
                raise
        return row

    @property
    def model(self) -> nn.Module:
        """The model the tracker measures (the one given at construction)."""
        return self._operators[""].op.model

    def adopt_rows(self, rows: list[dict[str, Any]], *, source: str | os.PathLike[str]) -> int:
        """Take in the recorded rows of the run this tracker continues; return how many.

        ``rows`` (e.g. the ``curvature`` rows of a resumed run's ``stats.json``, read from
        ``source``) are checked as a file's rows are when the tracker resumes one (steps
        increasing, the same ``kind``, ``top_k`` and ``settings``: the error names the
        argument that differs and ``source``).  Those at steps up to the count that the
        tracker has no row for are put in front of :attr:`rows` (in step order, never a
        duplicate step), and ``path`` is rewritten with them: a tracker built without the
        run's rows (``path=None``, or a new file) then holds the whole curve, where the
        run's files were rewritten with its new rows only.

        Raises
        ------
        spectral.io.CorruptFileError
            A row without an integer ``step``, or steps that do not increase.
        ValueError
            Rows of another measurement (named as in the class docstring).
        """
        checked = self._checked(rows, Path(source))
        have = {int(r["step"]) for r in self.rows}
        taken = [r for r in checked if int(r["step"]) <= self.count and int(r["step"]) not in have]
        if taken:
            self.rows = sorted([*taken, *self.rows], key=lambda r: int(r["step"]))
            if self.path is not None:
                write_rows(self.path, self.rows)
        return len(taken)

    # ------------------------------------------------------------------ measurement
    def _measure(self) -> dict[str, Any]:
        step = self.count
        check_attainable_tol(self.tol, self._operators[""].op)  # autocast may be on now
        rng = np.random.default_rng([self.seed, step])  # the eigen-solves' start/guard vectors
        row: dict[str, Any] = {"step": step, "kind": self.kind, "settings": self.settings}
        total = 0
        for name, counted in self._operators.items():
            counted.count = 0
            start = self._vectors.get(name) if self.warm_start else None
            keep = min(2 * self.top_k, counted.shape[0])  # warm-start vectors, at most n
            found = block_eigenpairs(
                counted, self.top_k, start=start, tol=self.tol, seed=rng, keep=keep
            )
            self._vectors[name] = found.subspace
            entry = {
                "top_eigenvalues": [float(v) for v in found.values],
                "residuals": [float(r) for r in found.residuals],
                "eigen_products": found.products,
                "warm": start is not None,
            }
            total += counted.count
            if name:
                row.setdefault("blocks", {})[name] = entry
            else:
                row.update(entry)
        row["tol"] = self.tol
        whole = self._operators[""]
        if self.trace_probes:
            whole.count = 0
            probes = _probe_rng(self.seed, step, _TRACE_STREAM)  # not the eigen-solves' stream
            est = trace(whole, method="hutchinson", num_matvecs=self.trace_probes, seed=probes)
            row["trace"] = float(est.value)
            row["trace_stderr"] = float(est.stderr) if math.isfinite(est.stderr) else None
            total += whole.count
        if self.density_every is not None and step % self.density_every == 0:
            whole.count = 0
            iters = min(self.density_iters, whole.shape[0])
            probes = _probe_rng(self.seed, step, _DENSITY_STREAM)
            density = slq(whole, iters, num_probes=self.density_probes, seed=probes)
            total += whole.count
            if self.path is not None:
                target = self.path.with_name(f"{self.path.stem}.density-{step:08d}.npz")
                density.save(target)
                row["density"] = target.name
        row["products"] = total
        return row

    # ------------------------------------------------------------------ file and restart
    @property
    def _state_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".ritz.npz")

    def _write(self) -> None:
        """Write the rows, then the warm-start state.

        In this order the state never holds a step the file has no row for (a crash
        between the two leaves a row without vectors: that measurement's successor
        starts cold), so a state ahead of the file means lost rows
        (:meth:`_check_state_not_ahead`).
        """
        assert self.path is not None
        write_rows(self.path, self.rows)
        if self._vectors:
            self._history[self.count] = {
                k: v.detach().cpu().numpy() for k, v in self._vectors.items()
            }
            for old in sorted(self._history)[: -self.KEEP_VECTORS]:
                del self._history[old]
            self._save_state()

    def _save_state(self) -> None:
        """Save the kept warm-start vectors (:attr:`KEEP_VECTORS` rows), or remove the
        state file when none are kept."""
        arrays = {f"v/{s}/{k}": v for s, vs in self._history.items() for k, v in vs.items()}
        if arrays:
            save_npz(self._state_path, **arrays)
        else:
            self._state_path.unlink(missing_ok=True)

    def _check_state_not_ahead(self, last: int, start_step: int | None) -> None:
        """Refuse a file that lost its last rows: its warm-start state (written after the
        rows, :meth:`_write`) holds vectors of a later step than the file's last row.

        A row deleted in the middle of the file is caught by the steps' spacing
        (:func:`_check_no_gap`); the last rows leave no gap behind, and their loss set
        the count back silently (a resumed run then labelled every later row with the
        wrong step).  Steps after ``start_step`` are not counted: a restart from an
        earlier step drops them and measures them again (a process killed between such a
        restart's two writes left its state ahead of its rows).
        """
        if not self._state_path.is_file():
            return
        steps = [int(key.split("/", 2)[1]) for key in load_npz(self._state_path)]
        ahead = [s for s in steps if s > last and (start_step is None or s <= start_step)]
        if ahead:
            raise CorruptFileError(
                f"File '{self.path}': its last row is at step {last}, but the tracker's "
                f"warm-start state '{self._state_path.name}' was written at step "
                f"{max(ahead)}: the rows after step {last} are missing (the file was cut or "
                "edited). Restore the file, or delete the state file to continue from "
                f"step {last} without them."
            )

    def _resume(self, start_step: int | None) -> None:
        assert self.path is not None
        start = None if start_step is None else _check_int("start_step", start_step, 0)
        if not self.path.is_file():
            self.count = 0 if start is None else start
            return
        rows = self._checked_rows()
        last = int(rows[-1]["step"]) if rows else 0
        self._check_state_not_ahead(last, start)
        if start is None:
            self.count = last
        else:
            self.count = start
            if self.count // self.every > last // self.every:  # a due measurement is missing
                raise argument_error(
                    "start_step",
                    f"a step at most one measurement after the file's last row (step {last}, "
                    f"every = {self.every}): the rows between would be missing",
                    start_step,
                )
        dropped = [r for r in rows if r["step"] > self.count]
        self.rows = [r for r in rows if r["step"] <= self.count]
        if dropped:
            logger.info(
                "tracker: %d rows after step %d dropped (re-measured)", len(dropped), self.count
            )
            write_rows(self.path, self.rows)
            self._remove_snapshots(dropped)
        self._load_vectors()
        if dropped:  # the state keeps no vectors of the abandoned rows either
            self._save_state()

    def _remove_snapshots(self, dropped: list[dict[str, Any]]) -> None:
        """Delete the density snapshots of rows dropped on a restart (files beside ``path``
        named ``<stem>.density-<step>.npz``), so that none is left without its row."""
        assert self.path is not None
        for row in dropped:
            name = f"{self.path.stem}.density-{int(row['step']):08d}.npz"
            if row.get("density") == name:
                self.path.with_name(name).unlink(missing_ok=True)

    def _checked_rows(self) -> list[dict[str, Any]]:
        """The file's rows: checksums verified, steps increasing, this tracker's settings."""
        assert self.path is not None
        try:
            found = read_rows(self.path)
        except UnicodeDecodeError as exc:
            raise CorruptFileError(f"File '{self.path}': not UTF-8 text ({exc}).") from exc
        return self._checked(found, self.path)

    def _checked(self, found: list[dict[str, Any]], source: Path) -> list[dict[str, Any]]:
        """``found`` (the rows of ``source``, named in errors) checked: an integer ``step`` in
        each, steps increasing, this tracker's ``kind``, ``top_k`` and settings."""
        rows: list[dict[str, Any]] = []
        for number, row in enumerate(found, start=1):
            try:
                step = int(row["step"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptFileError(
                    f"File '{source}', line {number}: not a tracker row ({exc})."
                ) from exc
            if rows and step <= int(rows[-1]["step"]):
                raise CorruptFileError(
                    f"File '{source}', line {number}: step {step} after step "
                    f"{rows[-1]['step']} (the rows of a tracker file increase)."
                )
            self._check_kind_and_top_k(row, number, source)
            if rows and "settings" in row:  # its every: checked against the tracker's below
                _check_no_gap(int(rows[-1]["step"]), step, row["settings"], number, source)
            if "settings" in row:  # files written before rows recorded them: not checked
                difference = settings_difference(row["settings"], self.settings)
                if difference is not None:
                    argument, what = difference
                    raise argument_error(
                        argument,
                        f"the measurement of the rows in '{source}' (a tracker continues "
                        "its file with the same matrix, measurement set and settings; use a "
                        "new path for another measurement)",
                        f"{what} (line {number})",
                    )
            rows.append(row)
        return rows

    def _check_kind_and_top_k(self, row: Mapping[str, Any], number: int, source: Path) -> None:
        """Refuse a row of another ``kind`` or ``top_k``, naming the argument and the file."""
        same = "a tracker continues its file with the same settings, or starts a new file"
        if row.get("kind") != self.kind:
            raise argument_error(
                "kind",
                f"the matrix of the rows in '{source}' ({row.get('kind')!r} at line "
                f"{number}; {same})",
                self.kind,
            )
        found = len(row.get("top_eigenvalues", ()))
        if found != self.top_k:
            raise argument_error(
                "top_k",
                f"as many eigenvalues as the rows in '{source}' hold ({found} at line "
                f"{number}; {same})",
                self.top_k,
            )

    def _load_vectors(self) -> None:
        """Warm-start vectors saved with the last kept row (when still in the file)."""
        if not self.rows or not self._state_path.is_file():
            return
        state = load_npz(self._state_path)
        for key, value in state.items():
            _, step, name = key.split("/", 2)
            if int(step) <= self.count:  # later ones: of a branch abandoned by this restart
                self._history.setdefault(int(step), {})[name] = value
        last = self._history.get(int(self.rows[-1]["step"]), {})
        for name, counted in self._operators.items():
            saved = last.get(name)
            template = counted.template_vector()
            if saved is not None and saved.ndim == 2 and saved.shape[0] == template.shape[0]:
                self._vectors[name] = torch.as_tensor(saved).to(template)

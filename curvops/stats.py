"""The paper's loss statistics over minibatches: gradient and curvature moments, norms.

Let the data be split into minibatches :math:`i = 1..m` of sizes :math:`N_i` (the
batches of ``data``, each cut into pieces of ``batch_size`` when given: its batch-major
inputs only, see :func:`minibatches`), with
weights :math:`w_i = \\nu_i / \\sum_j \\nu_j` by the loss's own normaliser (the sample
count :math:`N_i`, or the counted targets of a cross-entropy with ``ignore_index``, see
:func:`curvops.losses.batch_weight`), mean losses :math:`L_i`, gradients :math:`g_i` and
curvature matrices :math:`C_i` (Hessian or GGN of :math:`L_i`).  With
:math:`\\bar g = \\sum_i w_i g_i`, :math:`\\bar C = \\sum_i w_i C_i` (the full-data gradient
and curvature) and a unit direction :math:`z` (random, or e.g. a top eigenvector):

* ``loss_mean`` :math:`= \\sum_i w_i L_i`;
* ``loss_var`` :math:`= \\sum_i w_i (L_i - \\text{loss\\_mean})^2`;
* ``grad_mean_norm_sq`` :math:`= \\|\\bar g\\|^2`;
* ``grad_var`` :math:`= \\sum_i w_i\\|g_i - \\bar g\\|^2 = \\sum_i w_i\\|g_i\\|^2 - \\|\\bar g\\|^2`
  (trace of the gradient covariance over minibatches);
* ``hess_mean_norm_sq`` :math:`= \\|\\bar C z\\|^2`;
* ``hess_var`` :math:`= \\sum_i w_i \\|C_i z\\|^2 - \\|\\bar C z\\|^2 = z^\\top \\Sigma z` with
  :math:`\\Sigma = \\sum_i w_i C_i^2 - \\bar C^2`;
* ``hess_mu`` :math:`= \\mu = z^\\top \\bar C z` (Rayleigh quotient);
* ``delta`` :math:`= \\|\\bar C z - \\mu z\\|^2` (zero iff :math:`z` is an eigenvector);
* ``alpha`` :math:`= \\sqrt{\\text{hess\\_var}} / |\\mu|`.

With ``reduction="sum"`` the statistics are those of the summed loss: each minibatch's
quantities are taken as estimates :math:`(N/N_i) L_i`, :math:`(N/N_i) g_i`, ... of the
full-data ones with weights :math:`N_i/N` (the mean-loss statistics scaled by :math:`N`,
and by :math:`N^2` for squared quantities).

Following Wu et al. (2018, "How SGD selects the global minima"), :math:`\\mu` plays
the role of the *sharpness* :math:`a = \\lambda_{\\max}(\\bar C)` and
:math:`\\sqrt{z^\\top \\Sigma z}` that of the *non-uniformity*
:math:`s = \\lambda_{\\max}(\\Sigma)^{1/2}`
along :math:`z` (both exact when :math:`z` is the top eigenvector of :math:`\\bar C`
and of :math:`\\Sigma`); ``alpha`` is their ratio :math:`s/a`, the quantity that, with
the learning rate and batch size, decides linear stability of SGD at a minimum.
Also: a Hutchinson estimate of :math:`\\|\\bar C\\|_F^2 = \\mathbb{E}\\|\\bar C r\\|^2` (Rademacher
:math:`r`) and weight norms.

>>> import torch
>>> net = torch.nn.Linear(2, 1).double()
>>> data = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
>>> s = loss_stats(net, torch.nn.MSELoss(), data, batch_size=4, num_probes=2)
>>> s.num_batches, s.num_samples
(2, 8)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from curvops._model_state import check_bn_mode, curvature_mode, functional_forward
from curvops.curvature import ModelCurvatureOperator
from curvops.data import Batch, as_data, move_to, shape_noted
from curvops.determinism import outside_inference_mode
from curvops.distributed import all_reduce_sum, resolve_group, unwrap_model
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.inert_hooks import evaluate_loss
from curvops.losses import LossFn, batch_weight, loss_reduction, output_hessian_operator
from curvops.model_io import OutputFn, check_output_fn
from curvops.params import select_params
from curvops.products import hessian_linearization, jacobian_sandwich_matmat
from curvops.validation import checked_on_ranks, validated_on_ranks
from spectral.errors import NumericalError, argument_error

__all__ = [
    "LossStats",
    "hutchinson_frobenius_sq",
    "layer_weight_norms",
    "loss_stats",
    "minibatches",
    "weight_norms",
]


@dataclass
class LossStats:
    """The statistics of :func:`loss_stats` (floats; see the module docstring).

    Attributes
    ----------
    loss_mean, loss_var, grad_mean_norm_sq, grad_var : float
        Loss and gradient moments over the minibatches.
    hess_mean_norm_sq, hess_var, hess_mu, delta, alpha : float
        Curvature moments along the direction :math:`z`.
    frobenius_norm_sq, frobenius_norm_sq_stderr : float
        Hutchinson estimate of :math:`\\|\\bar C\\|_F^2` and its standard error.
    weight_norm_l2, weight_norm_linf : float
        Norms of the selected parameters.
    num_batches, num_samples : int
        Minibatches and samples used.
    curvature : str
        ``"hessian"`` or ``"ggn"``.
    layer_norms : dict
        Per parameter tensor ``name -> (L2, Linf)``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 1).double()
    >>> data = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    >>> s = loss_stats(net, torch.nn.MSELoss(), data, batch_size=4, num_probes=2)
    >>> type(s).__name__, s.loss_var >= 0.0, s.grad_var >= 0.0
    ('LossStats', True, True)
    """

    loss_mean: float
    loss_var: float
    grad_mean_norm_sq: float
    grad_var: float
    hess_mean_norm_sq: float
    hess_var: float
    hess_mu: float
    delta: float
    alpha: float
    frobenius_norm_sq: float
    frobenius_norm_sq_stderr: float
    weight_norm_l2: float
    weight_norm_linf: float
    num_batches: int
    num_samples: int
    curvature: str
    layer_norms: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A plain dictionary (``layer_norms`` included)."""
        return asdict(self)


class _Cutter:
    """Cuts the inputs of a pass's batches into minibatches (see :func:`minibatches`).

    A tensor is *batch-major* in a batch when its leading dimension is the batch's sample
    count (counted as the operators count it: the first tensor, or the data's
    ``as_data(..., batch_size=...)`` rule); batch-major tensors are cut, all others (a
    shared ``[T, T]`` attention mask, ``[1, T]`` position ids, scalars) are passed whole
    to every minibatch.  ``seen`` remembers, per input, whether it was batch-major in the
    first batch that held it: an input that is batch-major in one batch and not in
    another can only be batch-major by coincidence, and is refused.
    """

    def __init__(self) -> None:
        self.seen: dict[str, tuple[bool, int, tuple[int, ...]]] = {}

    def cut(self, batch: Batch, start: int, stop: int) -> Any:
        """``batch.inputs`` with every batch-major tensor cut to ``[start:stop]``."""
        return self._cut(batch.inputs, "inputs", batch, start, stop)

    def scan(self, batches: Iterable[Batch]) -> None:
        """Check every batch before any is cut (in-memory data: refused before any work)."""
        for batch in batches:
            self._cut(batch.inputs, "inputs", batch, 0, batch.size)

    def _cut(self, value: Any, path: str, batch: Batch, start: int, stop: int) -> Any:
        if isinstance(value, torch.Tensor):
            major = value.ndim >= 1 and int(value.shape[0]) == batch.size
            self._check(path, major, batch, tuple(value.shape))
            return value[start:stop] if major else value
        if isinstance(value, Mapping):
            return {k: self._cut(v, f"{path}[{k!r}]", batch, start, stop) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(
                self._cut(v, f"{path}[{i}]", batch, start, stop) for i, v in enumerate(value)
            )
        return value

    def _check(self, path: str, major: bool, batch: Batch, shape: tuple[int, ...]) -> None:
        first = self.seen.setdefault(path, (major, batch.index, shape))
        if first[0] == major:
            return
        was, now = ("cut", "kept whole") if first[0] else ("kept whole", "cut")
        raise argument_error(
            f"data (batch {batch.index})",
            f"inputs that are batch-major (leading dimension = the batch's sample count, "
            f"cut into minibatches) in every batch or in none; {path} has shape {shape} "
            f"with {batch.size} samples here ({now}) but {first[2]} in batch {first[1]} "
            f"({was}), so its length matches the sample count by coincidence somewhere. "
            f"Cut the batches yourself and pass them with batch_size=None",
            f"{path} of shape {shape}",
        )


def minibatches(data: Any, batch_size: int | None = None) -> Iterator[Batch]:
    """The batches of ``data``, each cut into consecutive pieces of ``batch_size``.

    Only the *batch-major* inputs are cut: the tensors whose leading dimension is the
    batch's sample count, counted as the operators count it (the length of the first
    tensor, or the key / position of an ``as_data(..., batch_size=...)`` rule).  Every
    other tensor (a shared ``[T, T]`` causal mask, ``[1, T]`` position ids) is passed
    whole to each piece.  A shared tensor whose leading dimension equals the sample count
    cannot be told apart from a batch-major one and is cut; where that holds in some
    batches and not in others (an unequal last batch) it is refused.  Declare the
    batch-major input with ``as_data(data, batch_size="input_ids")`` when the first
    tensor is not batch-major; a ``batch_size`` function cannot be followed into pieces.

    Parameters
    ----------
    data : batch, sequence of batches or DataLoader
        As for the operators.
    batch_size : int, optional
        Piece size (``None``: the batches as they are).

    Yields
    ------
    Batch
        Each piece, in order.

    Raises
    ------
    ValueError
        A bad ``batch_size``; data counted by a function; an input that is batch-major
        in one batch and not in another (names the batch and the input).

    Examples
    --------
    >>> [b.size for b in minibatches((torch.zeros(5, 1), torch.zeros(5)), 2)]
    [2, 2, 1]
    >>> mask = torch.ones(3, 3)  # shared: not cut
    >>> [b.inputs[1].shape[0] for b in minibatches(((torch.zeros(5, 3), mask), torch.zeros(5)), 2)]
    [3, 3, 3]
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise argument_error("batch_size", "None or an integer >= 1", batch_size)
    stream = as_data(data)
    if batch_size is not None and callable(stream.batch_size_rule):
        raise argument_error(
            "batch_size",
            "None for data whose samples are counted by a function (as_data(..., "
            "batch_size=<function>): which inputs are batch-major is unknown; declare the "
            "batch-major input's key or position instead)",
            batch_size,
        )
    cutter = _Cutter()
    if batch_size is not None and stream.is_in_memory:
        cutter.scan(stream)
    index = 0
    for batch in stream:
        if batch_size is None:  # as they are (inputs need not be batch-major)
            yield Batch(batch.inputs, batch.targets, batch.size, index)
            index += 1
            continue
        for start in range(0, batch.size, batch_size):
            stop = min(start + batch_size, batch.size)
            inputs = cutter.cut(batch, start, stop)
            yield Batch(inputs, batch.targets[start:stop], stop - start, index)
            index += 1


def weight_norms(model: nn.Module, params: Any = None) -> tuple[float, float]:
    """:math:`(\\|w\\|_2, \\|w\\|_\\infty)` over the selected parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    params : optional
        Parameter selection (default: all trainable).

    Returns
    -------
    (float, float)
        The norms.

    Examples
    --------
    >>> lin = torch.nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.fill_(-3.0)
    >>> weight_norms(lin)
    (3.0, 3.0)
    """
    named = select_params(model, params)
    sq = sum(float(p.detach().double().pow(2).sum()) for _, p in named)
    linf = max(float(p.detach().abs().max()) if p.numel() else 0.0 for _, p in named)
    return math.sqrt(sq), linf


def layer_weight_norms(model: nn.Module, params: Any = None) -> dict[str, tuple[float, float]]:
    """Per parameter tensor ``name -> (L2 norm, Linf norm)``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    params : optional
        Parameter selection (default: all trainable).

    Returns
    -------
    dict
        ``name -> (L2 norm, Linf norm)``.

    Examples
    --------
    >>> lin = torch.nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.fill_(-3.0)
    >>> layer_weight_norms(lin)
    {'weight': (3.0, 3.0)}
    """
    return {
        n: (float(p.detach().double().norm()), float(p.detach().abs().max()) if p.numel() else 0.0)
        for n, p in select_params(model, params)
    }


def hutchinson_frobenius_sq(
    operator: Any, *, num_probes: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson estimate of :math:`\\|A\\|_F^2 = \\mathbb{E}_r \\|A r\\|^2`, Rademacher probes.

    Returns ``(estimate, standard error)``; probes come from ``numpy.random.default_rng(seed)``
    and are applied in one ``matmat``.

    Parameters
    ----------
    operator : operator
        Anything with ``matmat``.
    num_probes : int
        Number of Rademacher probes.
    seed : int
        Seed of the probes.

    Returns
    -------
    (float, float)
        The estimate and its standard error.

    Examples
    --------
    >>> from curvops.structured import Diagonal
    >>> hutchinson_frobenius_sq(Diagonal(np.array([1.0, 2.0])), num_probes=3)[0]
    5.0
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise argument_error("num_probes", "an integer >= 1", num_probes)
    n = operator.shape[1]
    rng = np.random.default_rng(seed)
    R = rng.choice(np.array([-1.0, 1.0]), size=(n, num_probes)).astype(operator.dtype)
    AR = np.asarray(operator.matmat(R), dtype=np.float64)
    samples = (AR**2).sum(axis=0)
    stderr = float(samples.std(ddof=1) / math.sqrt(num_probes)) if num_probes > 1 else math.nan
    return float(samples.mean()), stderr


@outside_inference_mode
def loss_stats(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    batch_size: int | None = None,
    curvature: str = "hessian",
    z: Any = None,
    seed: int = 0,
    num_probes: int = 10,
    params: Any = None,
    bn_mode: str | None = None,
    process_group: Any = None,
    output_fn: OutputFn | None = None,
) -> LossStats:
    """Compute the statistics of the module docstring over the minibatches of ``data``.

    Parameters
    ----------
    batch_size:
        Cut every batch of ``data`` into minibatches of this size (None: use them as is).
        Only batch-major inputs are cut (leading dimension = the batch's sample count);
        shared tensors such as a ``[T, T]`` mask go whole to every minibatch (see
        :func:`minibatches` for the rule and the case it refuses).
    curvature:
        ``"hessian"`` or ``"ggn"`` (the ``hess_*`` fields then describe the GGN).
    z:
        Direction (length P, numpy or torch), normalised here; default a Gaussian
        direction from ``seed``.
    num_probes:
        Rademacher probes of the Frobenius estimate (``0`` skips it: NaN).
    process_group:
        Data parallelism as in the curvature operators (:mod:`curvops.distributed`):
        each rank holds a shard of ``data``; the weighted sums, the mean gradient and
        the mean curvature-direction product are added over the group with one
        ``all_reduce``, so every rank returns the statistics of the union of the
        shards (``num_batches``/``num_samples`` included).  ``None``: the default
        group when initialised; ``False``: this process only.
    output_fn:
        Which tensor of the model's output the loss takes, as for the operators (see
        :mod:`curvops.model_io`): ``None`` for a tensor output, the ``logits`` of a
        dict or Hugging Face ``ModelOutput``, or the first item of a tuple; or a
        callable ``output -> tensor``.  Every loss, gradient and curvature product
        (the Frobenius estimate's operator included) is of
        :math:`L(\\text{output\\_fn}(\\text{model}(x)), y)`.

    Returns
    -------
    LossStats
        The statistics (floats).

    Raises
    ------
    ValueError
        Bad arguments (a zero ``z``, unknown ``curvature``, ...; ``curvature="ggn"``
        with an ``output_fn`` selecting a 0-dimensional output, a loss computed inside
        the model).
    TypeError
        An ``output_fn`` that is not callable, or whose selection is not a tensor.
    spectral.errors.NumericalError
        Non-finite loss, gradient or product (names the minibatch).

    Examples
    --------
    >>> net = torch.nn.Linear(2, 1).double()
    >>> data = (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    >>> s = loss_stats(net, torch.nn.MSELoss(), data, batch_size=4, num_probes=2)
    >>> s.num_batches, s.num_samples, s.curvature
    (2, 8, 'hessian')
    """

    def local_checks() -> nn.Module:
        if curvature not in ("hessian", "ggn"):
            raise argument_error("curvature", "'hessian' or 'ggn'", curvature)
        check_bn_mode(bn_mode)
        check_output_fn(output_fn)
        return unwrap_model(model)

    model = checked_on_ranks(local_checks, process_group)  # a failure joins the check below
    validation, _ = validated_on_ranks(  # one all_gather with a process group
        model,
        loss_fn,
        data,
        params=params,
        bn_mode=bn_mode,
        output_fn=output_fn,
        process_group=process_group,
        settings={
            "function": "loss_stats",
            "curvature": curvature,
            "bn_mode": bn_mode,
            "batch_size": batch_size,
            "num_probes": num_probes,
            "seed": seed,
            "z": _direction_setting(z),
        },
        minibatch_size=batch_size,  # the minibatches cut from each batch are weighted
    )
    if curvature == "ggn":
        validation.check_outputs_before_the_loss("loss_stats")
    group = resolve_group(process_group)
    setting = _Setting(
        model,
        loss_fn,
        select_params(model, params),
        curvature,
        bn_mode,
        group,
        batch_size,
        output_fn,
    )
    zv, moments = _reduced_moments(setting, data, validation, z, seed, keep=bool(num_probes))
    if num_probes:
        rule = as_data(data).batch_size_rule
        stream = data if batch_size is None else as_data(moments.kept, batch_size=rule)
        fro, fro_err = _frobenius(setting, stream, num_probes, seed)
    else:
        fro, fro_err = math.nan, math.nan
    return _assemble(setting, moments, zv, (fro, fro_err), params)


def _reduced_moments(
    setting: _Setting, data: Any, validation: Any, z: Any, seed: int, *, keep: bool
) -> tuple[torch.Tensor, _Moments]:
    """The unit direction and the moments of every rank's minibatches (:func:`_sweep`, then
    one ``all_reduce`` over the group).

    A rank whose own sweep raises (a non-finite minibatch, a one-sample batch under
    train-mode BatchNorm) still joins the reduction with a failure flag
    (:func:`curvops.distributed.all_reduce_sum`): it raises its own error and the others a
    ``RuntimeError`` naming it.  A job without a counted target (on any rank) is refused
    after the reduction, on every rank alike.
    """
    named = setting.named
    P = sum(p.numel() for _, p in named)
    try:
        zv, z_parts = _unit_direction(z, named, seed)
        moments = _sweep(setting, data, validation, z_parts, keep=keep)
    except Exception as exc:
        if setting.group is None:
            raise
        _Moments.zeros(P, named[0][1].device).all_reduce(setting.group, error=exc)
        raise  # (not reached: the line above raises exc)
    moments.all_reduce(setting.group)
    if moments.sums["w"] == 0:  # the reduced sums: the same test on every rank
        where = "" if setting.group is None else " (over all ranks of the process group)"
        raise argument_error(
            "data",
            f"at least one batch with a counted target{where}",
            f"{moments.num_batches} minibatches with a counted target",
        )
    return zv, moments


def _direction_setting(z: Any) -> Any:
    """``z`` as a setting every rank must share (float64 on the host; its type when it is
    not numeric, so the rank-local check of ``z`` names it)."""
    if z is None:
        return None
    if isinstance(z, torch.Tensor):
        return z.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(np.asarray(z, dtype=np.float64))
    except (TypeError, ValueError):
        return type(z)


@dataclass(frozen=True)
class _Setting:
    """What :func:`loss_stats` measures: the model, loss, selected parameters, modes and
    the model output the loss takes (``output_fn``, see :mod:`curvops.model_io`)."""

    model: nn.Module
    loss_fn: LossFn
    named: list[tuple[str, nn.Parameter]]
    curvature: str
    bn_mode: str | None
    group: Any
    batch_size: int | None
    output_fn: OutputFn | None = None

    @property
    def names(self) -> list[str]:
        """The selected parameters' names."""
        return [n for n, _ in self.named]

    @property
    def summed(self) -> bool:
        """Whether the loss sums over samples (``reduction="sum"``)."""
        return loss_reduction(self.loss_fn) == "sum"


def _unit_direction(
    z: Any, named: list[tuple[str, nn.Parameter]], seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unit direction :math:`z` (float64, flat) and its ``(1, *shape)`` parameter parts.

    ``z=None`` draws a Gaussian direction from ``seed``; a given ``z`` must have one
    entry per selected parameter entry and be non-zero and finite.  The parts are in
    the parameters' dtype, on their device.
    """
    device, dtype = named[0][1].device, named[0][1].dtype
    P = sum(p.numel() for _, p in named)
    if z is None:
        zv = torch.as_tensor(np.random.default_rng(seed).standard_normal(P))
    else:
        zv = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z)
        if zv.shape != (P,):
            raise argument_error("z", f"a vector of length {P}", z)
    zv = zv.to(device=device, dtype=torch.float64)
    znorm = float(zv.norm())
    if not znorm > 0 or not math.isfinite(znorm):
        raise argument_error("z", "a non-zero finite vector", z)
    zv = zv / znorm
    z_parts, start = [], 0
    for _, p in named:
        z_parts.append(zv[start : start + p.numel()].reshape(1, *p.shape).to(dtype))
        start += p.numel()
    return zv, z_parts


@dataclass
class _Moments:
    """Weighted sums over the minibatches (see the module docstring).

    ``sums`` holds :math:`\\sum w_i` (``"w"``), the sample count (``"n"``) and
    :math:`\\sum w_i L_i`, :math:`\\sum w_i L_i^2`, :math:`\\sum w_i \\|g_i\\|^2`,
    :math:`\\sum w_i \\|C_i z\\|^2` (``"L"``, ``"L2"``, ``"g2"``, ``"Cz2"``); ``gbar`` and
    ``czbar`` the weighted sums of :math:`g_i` and :math:`C_i z` (float64, length P);
    ``kept`` the minibatches for the Frobenius estimate when they are cut from
    ``data``.
    """

    gbar: torch.Tensor
    czbar: torch.Tensor
    sums: dict[str, float] = field(
        default_factory=lambda: {"w": 0.0, "n": 0.0, "L": 0.0, "L2": 0.0, "g2": 0.0, "Cz2": 0.0}
    )
    num_batches: int = 0
    kept: list[tuple[Any, torch.Tensor]] = field(default_factory=list)

    def add(self, w: float, size: int, loss: float, g: torch.Tensor, czv: torch.Tensor) -> None:
        """Add one minibatch of weight ``w`` and ``size`` samples."""
        sums = self.sums
        sums["w"] += w
        sums["n"] += size
        sums["L"] += w * loss
        sums["L2"] += w * loss * loss
        sums["g2"] += w * float(g @ g)
        sums["Cz2"] += w * float(czv @ czv)
        self.gbar += w * g
        self.czbar += w * czv

    @classmethod
    def zeros(cls, size: int, device: torch.device) -> _Moments:
        """Empty sums for vectors of length ``size``."""
        return cls(
            gbar=torch.zeros(size, dtype=torch.float64, device=device),
            czbar=torch.zeros(size, dtype=torch.float64, device=device),
        )

    def all_reduce(self, group: Any, error: Exception | None = None) -> None:
        """Sum everything (batch count included) over ``group`` in one ``all_reduce``.

        ``error``: this rank's sweep failed (it raises ``error`` after the collective,
        and the other ranks a ``RuntimeError`` naming it).  ``kept`` stays local.
        """
        if group is None:
            if error is not None:
                raise error
            return
        keys = list(self.sums)
        scalars = torch.tensor(
            [self.sums[k] for k in keys] + [float(self.num_batches)],
            dtype=torch.float64,
            device=self.gbar.device,
        )
        scalars, self.gbar, self.czbar = all_reduce_sum(
            [scalars, self.gbar, self.czbar], group, error=error, where="loss_stats"
        )
        self.sums = dict(zip(keys, scalars[:-1].tolist()))
        self.num_batches = int(scalars[-1])


def _sweep(
    setting: _Setting, data: Any, validation: Any, z_parts: list[torch.Tensor], *, keep: bool
) -> _Moments:
    """One pass over the minibatches of ``data``, adding each into a :class:`_Moments`.

    Minibatches of weight 0 (every target ignored) are skipped.  With
    ``reduction="sum"`` each minibatch enters as its mean-equivalent (weight
    :math:`N_i`, quantities divided by :math:`N_i`); :func:`_assemble` rescales.
    ``keep`` holds on to cut minibatches for the Frobenius estimate.
    """
    streamed = not as_data(data).is_in_memory
    named, batch_size = setting.named, setting.batch_size
    moments = _Moments.zeros(sum(p.numel() for _, p in named), named[0][1].device)
    spare: list[tuple[Any, torch.Tensor]] = []
    with curvature_mode(setting.model, setting.bn_mode):
        for batch in minibatches(data, batch_size):
            if streamed:  # (a piece of a cut batch has the batch's targets and shapes)
                validation.check_streamed(batch.inputs, batch.targets, batch.index)
            if setting.summed:  # the mean-equivalent of the minibatch; rescaled by N at the end
                w, per = float(batch.size), 1.0 / batch.size
            else:
                w = batch_weight(setting.loss_fn, batch.inputs, batch.targets, batch.size)
                per = 1.0
            if w == 0:
                if batch_size is not None and keep and not spare:
                    spare.append((batch.inputs, batch.targets))
                continue
            moments.num_batches += 1
            if batch_size is not None and keep:
                moments.kept.append((batch.inputs, batch.targets))
            with shape_noted(batch, validation.shapes):
                loss, g, czv = _minibatch_terms(setting, batch, z_parts, per)
            moments.add(w, batch.size, loss, g, czv)
    if not moments.kept:  # a shard of padding only: one minibatch of weight 0 (adds zeros),
        moments.kept = spare  # so that this rank can build the estimate's operator too
    return moments


def _minibatch_terms(
    setting: _Setting, batch: Batch, z_parts: list[torch.Tensor], per: float
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """:math:`(L_i, g_i, C_i z)` of one minibatch, each times ``per`` (float64, flat).

    One linearisation of the loss gives the loss, the gradient and (for the Hessian)
    the Hessian-direction product; the GGN product is a Jacobian sandwich around the
    loss's output Hessian.

    Raises
    ------
    spectral.errors.NumericalError
        A non-finite loss, gradient or product (names the minibatch).
    """
    model, loss_fn, named, names = setting.model, setting.loss_fn, setting.named, setting.names
    device, dtype = named[0][1].device, named[0][1].dtype
    inputs = move_to(batch.inputs, device, dtype)
    targets = move_to(batch.targets, device, dtype)
    params0 = [p.detach() for _, p in named]

    def forward(tensors: list[torch.Tensor]) -> torch.Tensor:
        return functional_forward(model, names, tensors, inputs, setting.output_fn)

    def loss_of(tensors: list[torch.Tensor]) -> torch.Tensor:
        return evaluate_loss(loss_fn, forward(tensors), targets)

    lin = hessian_linearization(loss_of, params0)
    if setting.curvature == "hessian":
        cz = lin.apply(z_parts)
    else:

        def q(out: torch.Tensor) -> Any:
            return output_hessian_operator(loss_fn, out, targets)

        cz = jacobian_sandwich_matmat(forward, params0, z_parts, q)
    g = torch.cat([t.reshape(-1) for t in lin.grad]).double() * per
    czv = torch.cat([t.reshape(-1) for t in cz]).double() * per
    loss = float(lin.loss) * per
    if not (math.isfinite(loss) and bool(torch.isfinite(g).all())) or not bool(
        torch.isfinite(czv).all()
    ):
        raise NumericalError(f"loss_stats: non-finite values in minibatch {batch.index}.")
    return loss, g, czv


def _frobenius(setting: _Setting, stream: Any, num_probes: int, seed: int) -> tuple[float, float]:
    """Hutchinson estimate of :math:`\\|\\bar C\\|_F^2` (and its standard error) over ``stream``."""
    cls = HessianOperator if setting.curvature == "hessian" else GGNOperator
    op: ModelCurvatureOperator = cls(
        setting.model,
        setting.loss_fn,
        stream,
        params=setting.names,
        bn_mode=setting.bn_mode,
        process_group=False if setting.group is None else setting.group,
        output_fn=setting.output_fn,
    )
    return hutchinson_frobenius_sq(op, num_probes=num_probes, seed=seed)


def _assemble(
    setting: _Setting,
    moments: _Moments,
    zv: torch.Tensor,
    frobenius: tuple[float, float],
    params: Any,
) -> LossStats:
    """The :class:`LossStats` from the (reduced) weighted sums, as the module docstring says."""
    sums = moments.sums
    N = sums["w"]
    gbar = moments.gbar / N
    czbar = moments.czbar / N
    loss_mean = sums["L"] / N
    mu = float(zv @ czbar)
    hess_mean_norm_sq = float(czbar @ czbar)
    hess_var = sums["Cz2"] / N - hess_mean_norm_sq
    residual = czbar - mu * zv
    # reduction="sum": every quantity above is of the mean-equivalent loss L/N; the
    # summed loss's are N (first moments) and N^2 (second moments) times larger.
    s1 = sums["n"] if setting.summed else 1.0
    s2 = s1 * s1
    l2, linf = weight_norms(setting.model, params)
    return LossStats(
        loss_mean=loss_mean * s1,
        loss_var=(sums["L2"] / N - loss_mean**2) * s2,
        grad_mean_norm_sq=float(gbar @ gbar) * s2,
        grad_var=(sums["g2"] / N - float(gbar @ gbar)) * s2,
        hess_mean_norm_sq=hess_mean_norm_sq * s2,
        hess_var=hess_var * s2,
        hess_mu=mu * s1,
        delta=float(residual @ residual) * s2,
        alpha=math.sqrt(max(hess_var, 0.0)) / abs(mu) if mu != 0 else math.inf,
        frobenius_norm_sq=frobenius[0],
        frobenius_norm_sq_stderr=frobenius[1],
        weight_norm_l2=l2,
        weight_norm_linf=linf,
        num_batches=moments.num_batches,
        num_samples=int(sums["n"]),
        curvature=setting.curvature,
        layer_norms=layer_weight_norms(setting.model, params),
    )

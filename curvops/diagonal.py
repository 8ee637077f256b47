"""Diagonal of the GGN: exact, and the Monte-Carlo estimate used by diagonal methods.

With per-sample output factors :math:`\\nabla^2_{f_n} L_b = \\sum_j s_{nj} a_{nj} a_{nj}^\\top`
(closed-form square roots for cross-entropy, MSE and BCE, see
:func:`curvops.losses.output_hessian_factor`),

.. math::
    \\mathrm{diag}(G) = \\frac{1}{W}\\sum_b w_b \\sum_{n \\in b} \\sum_j s_{nj}\\,
    \\big(J_n^\\top a_{nj}\\big)^{\\odot 2},

with the loss's own batch weights :math:`w_b` (:func:`curvops.losses.batch_weight`:
sample counts, or counted targets for cross-entropy with ``ignore_index``/``weight=``),
:math:`W = \\sum_b w_b`, or :math:`w_b = W = 1` for ``reduction="sum"``.

``method="exact"`` uses all :math:`C` factor columns per sample (:math:`C - 1` for
softmax cross-entropy, whose output Hessian has rank :math:`C - 1`): :math:`N C`
vector-Jacobian products :math:`J_n^\\top a_{nj}`.  Where the samples of a batch do not
interact (no BatchNorm in training mode, and every sample's output computed alone
equals its row of the batch's output: checked), each product is taken through that
sample's own Jacobian (``torch.func``, vectorised over samples and columns): the cost
of about :math:`C` backward passes over the batch.  Otherwise (batch statistics couple
the samples) each product is a backward pass over the whole batch, batched in chunks
of ``chunk_size``: about :math:`N C / \\text{chunk}` passes and ``chunk_size * P``
memory, so that path suits small batches and output dimensions.  ``method="mc"``
replaces the factors by ``mc_samples`` sampled NLL gradients per sample (those of
:class:`curvops.FisherOperator` with ``kind="mc"``, same seed: the result is exactly
the diagonal of that Fisher), :math:`N M` products: an unbiased estimate of the GGN
diagonal (Dangel et al.'s DiagGGN-MC).

Both paths vectorise pullbacks with ``vmap`` (``torch.func`` per sample,
``is_grads_batched`` in chunks), whose batching rules PyTorch does not always get
right (``torch.cdist`` in torch 2.13: a prototype network's diagonal 25 % off).  So
each batch's vectorised pullbacks are checked against one plain backward pass
(:func:`_pullbacks_agree`): their sum over samples and columns, mixed with fixed
distinct weights :math:`c_{nj} \\in [1, 2)`, must equal the batch's own pullback of
the mixed cotangent :math:`J^\\top \\sum_{nj} c_{nj}\\, e_n \\otimes a_{nj}` within
rounding.  On a mismatch the batch is computed again with fewer ``vmap`` (per-sample
path: the chunked one, itself checked; chunked path: one plain backward pass per
column), and a warning is logged.

>>> import torch
>>> net = torch.nn.Linear(2, 2).double()
>>> data = (torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
>>> ggn_diagonal(net, torch.nn.CrossEntropyLoss(), data).shape
torch.Size([6])
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from curvops._model_state import check_bn_mode, curvature_mode, functional_forward
from curvops.data import as_data, first_tensor, move_to, shape_noted
from curvops.differentiability import UntrackedUseRecorder
from curvops.distributed import all_reduce_weighted, resolve_group, unwrap_model
from curvops.fisher import fisher_output_factor
from curvops.kronecker import drop_null_column
from curvops.losses import (
    LossFn,
    batch_generator,
    batch_normaliser,
    batch_weight,
    check_curved_loss,
    loss_kind,
    loss_reduction,
    output_hessian_factor,
)
from curvops.model_io import OutputFn, check_output_fn
from curvops.params import select_params
from curvops.precision import accumulation_dtype
from curvops.validation import Validation, checked_on_ranks, validated_on_ranks
from spectral.errors import NumericalError, argument_error

__all__ = ["ggn_diagonal"]

logger = logging.getLogger(__name__)


def _mixing_weights(n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed, pairwise distinct weights :math:`c_{nj} \\in [1, 2)` (``(n, r)``, no random
    stream): :math:`1 + \\{k\\varphi\\}` for :math:`k = nr + j`, fractional parts of
    multiples of the golden ratio, so that no pattern of errors (permuted columns, a
    sign) cancels in the mixed sums of :func:`_pullbacks_agree`."""
    k = torch.arange(n * r, dtype=torch.float64, device=like.device)
    return (1.0 + torch.frac(k * 0.6180339887498949)).reshape(n, r).to(like.dtype)


def _squares_and_checks(
    grads: Any, signs: torch.Tensor, mix: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per leaf, from a group of pullbacks :math:`g_k` (leading dimension ``k``):
    :math:`\\sum_k s_k g_k^{\\odot 2}` (the diagonal's part), and for
    :func:`_pullbacks_agree` the mixed sum :math:`\\sum_k c_k g_k` and the scale
    :math:`\\|c\\|_2 (\\sum_k g_k^{\\odot 2})^{1/2}`, which bounds
    :math:`\\sum_k c_k |g_k|` (Cauchy-Schwarz) by at most :math:`2\\sqrt{k}` times
    (:math:`c_k \\in [1, 2)`): two passes over the pullbacks besides their squares."""
    weights = torch.stack([signs, torch.ones_like(signs)])
    parts = []
    for g in grads:
        both = torch.einsum("wk,k...->w...", weights, g * g)
        mixed = torch.einsum("k,k...->...", mix, g)
        parts.append((both[0], mixed, torch.linalg.vector_norm(mix) * both[1].sqrt()))
    return parts


class _PullbackCheck:
    """The mixed sum of vectorised pullbacks :math:`\\sum c_{nj} g_{nj}`, :math:`g_{nj} =
    J_n^\\top a_{nj}`, and its rounding scale (:func:`_squares_and_checks`), per leaf,
    that :func:`_pullbacks_agree` compares with one plain backward pass."""

    def __init__(self, leaves: list[torch.Tensor], mix: torch.Tensor) -> None:
        self.mix = mix
        self.mixed = [torch.zeros_like(leaf) for leaf in leaves]
        self.scale = [torch.zeros_like(leaf) for leaf in leaves]

    def add(self, i: int, mixed: torch.Tensor, scale: torch.Tensor) -> None:
        """Add leaf ``i``'s parts (summed over any leading dimension beyond its shape)."""
        extra = tuple(range(mixed.ndim - self.mixed[i].ndim))
        self.mixed[i] += mixed.sum(dim=extra) if extra else mixed
        self.scale[i] += scale.sum(dim=extra) if extra else scale


def _pullbacks_agree(
    out: torch.Tensor, leaves: list[torch.Tensor], factor: torch.Tensor, check: _PullbackCheck
) -> bool:
    """Whether the vectorised pullbacks summed in ``check`` equal the batch's own pullback.

    One plain backward pass of the mixed cotangent :math:`U = \\sum_{nj} c_{nj}\\, e_n
    \\otimes a_{nj}` gives :math:`J^\\top U`, mathematically equal to the mixed sum
    :math:`\\sum_{nj} c_{nj} g_{nj}`.  Both are sums of the same terms, rounded in
    different orders and kernels (per sample, from outputs recomputed alone, which
    match the batch's within :math:`10^3\\varepsilon`), so the bound is
    :math:`\\|J^\\top U - \\sum c\\, g\\|_\\infty \\le 10^3\\varepsilon
    \\max(\\|S\\|_\\infty, \\|J^\\top U\\|_\\infty)`: rounding of each term relative to
    the sum of their magnitudes :math:`S \\ge \\sum c\\, |g|` (elementwise; the
    Cauchy-Schwarz bound of :func:`_squares_and_checks`, summed over the groups), with
    a factor :math:`10^3` for the depth of the network and the summation orders.  A
    wrong batching rule errs by the size of the pullbacks themselves (``cdist``: 25 to
    100 %).
    """
    U = torch.einsum("ncr,nr->nc", factor, check.mix).reshape(out.shape)
    batched = torch.autograd.grad(
        out, leaves, U, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    pairs = [(b, m) for b, m in zip(batched, check.mixed) if b.numel()]
    err = max((float((b - m).abs().max()) for b, m in pairs), default=0.0)
    size = max((float(t.abs().max()) for t in [*check.scale, *batched] if t.numel()), default=0.0)
    bound = 1e3 * torch.finfo(out.dtype).eps * size
    if err <= bound:
        return True
    logger.warning(
        "ggn_diagonal: the vectorised (vmap) pullbacks of a batch disagree with its plain "
        "backward pass (error %.2e > bound %.2e): a batching rule of an operation of the "
        "model is wrong in this PyTorch (torch.cdist's in 2.13); the batch is computed "
        "again with fewer vmap (exact, slower).",
        err,
        bound,
    )
    return False


def _chunk_grads(
    out: torch.Tensor, leaves: list[torch.Tensor], R: torch.Tensor, batched: bool
) -> tuple[torch.Tensor, ...]:
    """The pullbacks of the cotangents ``R`` (``(k, *out.shape)``), stacked per leaf:
    one ``is_grads_batched`` pass, or ``k`` plain backward passes (no ``vmap``)."""
    if batched:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return torch.autograd.grad(
                out,
                leaves,
                R,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
    rows = [
        torch.autograd.grad(
            out, leaves, u, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for u in R
    ]
    return tuple(torch.stack(parts) for parts in zip(*rows))


def _sum_squared_vjps(
    out: torch.Tensor,
    leaves: list[torch.Tensor],
    factor: torch.Tensor,
    signs: torch.Tensor,
    chunk_size: int,
    batched: bool = True,
) -> torch.Tensor:
    """:math:`\\sum_{n,j} s_{nj} (J^\\top e_n \\otimes a_{nj})^{\\odot 2}` as a flat vector.

    ``batched``: ``chunk_size`` pullbacks per ``is_grads_batched`` pass, checked by
    :func:`_pullbacks_agree` (on a mismatch computed again with ``batched=False``:
    one plain backward pass per pullback).
    """
    n, c, r = factor.shape
    total = [torch.zeros_like(leaf) for leaf in leaves]
    check = _PullbackCheck(leaves, _mixing_weights(n, r, out))
    pairs = [(i, j) for i in range(n) for j in range(r)]
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        R = torch.zeros(len(chunk), n, c, dtype=out.dtype, device=out.device)
        rows = torch.tensor([i for i, _ in chunk], device=out.device)
        cols = torch.tensor([j for _, j in chunk], device=out.device)
        R[torch.arange(len(chunk), device=out.device), rows] = factor[rows, :, cols]
        grads = _chunk_grads(out, leaves, R.reshape(len(chunk), *out.shape), batched)
        used = [i for i, g in enumerate(grads) if tuple(g.shape) == (len(chunk), *total[i].shape)]
        parts = _squares_and_checks(
            [grads[i] for i in used], signs[rows, cols], check.mix[rows, cols]
        )
        for i, (squares, mixed, scale) in zip(used, parts):  # unused: materialised zeros
            total[i] += squares
            check.add(i, mixed, scale)
    if batched and not _pullbacks_agree(out, leaves, factor, check):
        return _sum_squared_vjps(out, leaves, factor, signs, chunk_size, batched=False)
    return torch.cat([t.reshape(-1) for t in total])


#: elements of per-sample gradients held at once by the per-sample path (``r * P`` each)
_PER_SAMPLE_BUDGET = 1 << 23


def _batch_coupled(model: nn.Module) -> bool:
    """Whether a module mixes the samples of a batch (batch statistics of normalisations)."""
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


def _per_sample_inputs(inputs: Any, n: int) -> bool:
    """A tensor, or a tuple/list/mapping of tensors, all of batch size ``n``."""
    leaves = list(inputs.values()) if isinstance(inputs, dict) else inputs
    if isinstance(inputs, torch.Tensor):
        leaves = [inputs]
    if not isinstance(leaves, (list, tuple)) or not leaves:
        return False
    return all(isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == n for t in leaves)


def _sum_squared_per_sample(
    model: nn.Module,
    names: list[str],
    leaves: list[torch.Tensor],
    inputs: Any,
    out: torch.Tensor,
    factor: torch.Tensor,
    signs: torch.Tensor,
    output_fn: OutputFn | None = None,
) -> torch.Tensor | None:
    """:func:`_sum_squared_vjps` from per-sample Jacobians (``torch.func``), or ``None``.

    Each sample's output is recomputed alone (a batch of one) and its ``r`` factor
    columns are pulled back through that sample's Jacobian only (the output chosen by
    ``output_fn``, as for ``out``): :math:`N r` products of
    single-sample cost instead of :math:`N r` full-batch backward passes, in chunks of
    samples holding at most ``_PER_SAMPLE_BUDGET`` gradient entries.  This equals
    the batch's Jacobian rows only when samples do not interact; ``None`` (use the
    batched products) when a sample's output alone differs from its row of ``out``
    beyond rounding, ``torch.func`` cannot run the model, or the vectorised pullbacks
    disagree with one plain backward pass of the batch (:func:`_pullbacks_agree`:
    a wrong ``vmap`` rule, e.g. ``torch.cdist``'s in torch 2.13).
    """
    n, _, r = factor.shape
    if out.dtype not in (torch.float32, torch.float64) or not _per_sample_inputs(inputs, n):
        return None  # half precision: rounding too coarse to tell interacting samples apart
    primals = tuple(leaf.detach() for leaf in leaves)

    def one(x_n: Any, S_n: torch.Tensor, s_n: torch.Tensor, c_n: torch.Tensor) -> Any:
        def forward(*ps: torch.Tensor) -> torch.Tensor:
            x1 = tree_map(lambda t: t.unsqueeze(0), x_n)
            return functional_forward(model, names, list(ps), x1, output_fn).reshape(-1)

        y_n, pull = torch.func.vjp(forward, *primals)[:2]
        grads = torch.func.vmap(pull)(S_n.T.contiguous())
        return y_n, _squares_and_checks(grads, s_n, c_n)

    size = sum(p.numel() for p in primals)
    step = max(1, min(n, _PER_SAMPLE_BUDGET // max(r * size, 1)))
    totals = [torch.zeros_like(p) for p in primals]
    check = _PullbackCheck(list(primals), _mixing_weights(n, r, out))
    rows = out.detach().reshape(n, -1)
    if not bool(torch.isfinite(rows).all()):
        return None  # no tolerance to compare with (the batched products see the cause)
    tol = 1e3 * torch.finfo(out.dtype).eps
    atol = tol * max(float(rows.abs().max()), 1.0) if rows.numel() else tol
    for start in range(0, n, step):
        part = tree_map(lambda t, s=start: t[s : s + step], inputs)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                y, parts = torch.func.vmap(one)(
                    part,
                    factor[start : start + step],
                    signs[start : start + step],
                    check.mix[start : start + step],
                )
        except (RuntimeError, NotImplementedError, ValueError):
            return None  # an operation without a per-sample (vmap) rule: batched products
        if y.shape != rows[start : start + step].shape or not torch.allclose(
            y, rows[start : start + step], rtol=tol, atol=atol
        ):
            return None  # samples interact: a sample alone is not its row of the batch
        for i, (squares, mixed, scale) in enumerate(parts):
            totals[i] += squares.sum(dim=0)
            check.add(i, mixed, scale)
    if not _pullbacks_agree(out, leaves, factor, check):
        return None  # a wrong vmap rule: the chunked products (checked again there)
    return torch.cat([t.reshape(-1) for t in totals])


def _check_settings(
    loss_fn: LossFn, method: str, mc_samples: int, chunk_size: int, bn_mode: str | None
) -> None:
    """The arguments of :func:`ggn_diagonal` other than the model and the data."""
    if method not in ("exact", "mc", "empirical"):
        raise argument_error("method", "'exact', 'mc' or 'empirical'", method)
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise argument_error("mc_samples", "an integer >= 1", mc_samples)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise argument_error("chunk_size", "an integer >= 1", chunk_size)
    check_bn_mode(bn_mode)
    if method == "exact":
        check_curved_loss(loss_fn)


def _validated(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Any,
    bn_mode: str | None,
    method: str,
    process_group: Any,
    output_fn: OutputFn | None,
    sampling: tuple[int, int] = (1, 0),
) -> Validation:
    """The construction checks of :func:`ggn_diagonal`, agreed across ranks (one
    ``all_gather`` with a process group: :func:`curvops.validation.validate_across_ranks`).

    The settings every rank must share: ``method`` and ``bn_mode``, for ``method="mc"``
    also ``sampling`` = ``(mc_samples, seed)`` (``output_fn`` is compared by the checks)."""
    settings: dict[str, Any] = {"function": "ggn_diagonal", "method": method, "bn_mode": bn_mode}
    if method == "mc":
        settings.update(mc_samples=sampling[0], seed=sampling[1])
    validation, _ = validated_on_ranks(
        model,
        loss_fn,
        data,
        params=params,
        bn_mode=bn_mode,
        output_fn=output_fn,
        process_group=process_group,
        settings=settings,
    )
    return validation


def ggn_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    method: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    params: Any = None,
    bn_mode: str | None = None,
    chunk_size: int = 64,
    process_group: Any = False,
    output_fn: OutputFn | None = None,
) -> torch.Tensor:
    """Diagonal of the GGN of the mean loss over ``data`` (a length-P tensor on the model's device).

    Parameters
    ----------
    method:
        ``"exact"``, ``"mc"`` (Monte-Carlo, ``mc_samples`` targets per sample, ``seed``) or
        ``"empirical"`` (the diagonal of the empirical Fisher, true targets).
    chunk_size:
        Vector-Jacobian products batched together.
    process_group:
        ``False`` (default): this process's data only; ``None`` (the default group when
        :mod:`torch.distributed` is initialised) or a ``ProcessGroup``: every rank holds
        a shard of the data and the weighted sums and weights are summed over the group
        (one ``all_reduce``), giving the diagonal over the union of the shards.
    params, bn_mode:
        As for the operators (model never changed).
    output_fn:
        Which tensor of the model's output the loss takes, as for the operators (see
        :mod:`curvops.model_io`): ``None`` for a tensor output, the ``logits`` of a
        dict or Hugging Face ``ModelOutput``, or the first item of a tuple; or a
        callable ``output -> tensor``.  The result is the diagonal of
        ``GGNOperator(..., output_fn=output_fn)`` (``method="exact"``).

    Returns
    -------
    torch.Tensor
        The diagonal, length :math:`P`, in parameter order, on the model's device.

    Raises
    ------
    ValueError
        Unknown ``method``, ``mc_samples < 1``, ``chunk_size < 1``; ``method="mc"``
        with a loss without a likelihood; bad data/params/bn_mode; an ``output_fn``
        selecting a 0-dimensional output (a loss computed inside the model).
    TypeError
        An ``output_fn`` that is not callable, or whose selection is not a tensor.
    spectral.errors.NumericalError
        Non-finite values (names the batch).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops.testing import dense_ggn
    >>> d = ggn_diagonal(net, loss, (x, y), method="exact")
    >>> bool(torch.allclose(d, torch.diagonal(dense_ggn(net, loss, (x, y)))))
    True
    """

    def local_checks() -> nn.Module:
        _check_settings(loss_fn, method, mc_samples, chunk_size, bn_mode)
        check_output_fn(output_fn)
        return unwrap_model(model)

    # a rank whose arguments are refused still joins the collective check
    model = checked_on_ranks(local_checks, process_group)
    validation = _validated(
        model,
        loss_fn,
        data,
        params,
        bn_mode,
        method,
        process_group,
        output_fn,
        (mc_samples, seed),
    )
    validation.check_outputs_before_the_loss("ggn_diagonal")
    named = select_params(model, params)
    setting = _Diagonal(model, loss_fn, named, method, mc_samples, seed, chunk_size, output_fn)
    group = resolve_group(process_group)
    size, wide = sum(p.numel() for _, p in named), accumulation_dtype(named[0][1].dtype)
    try:
        total, count = _local_diagonal(setting, as_data(data), validation, bn_mode)
    except Exception as exc:  # with a group: still join the reduction, every rank stops
        if group is None:
            raise
        zeros = torch.zeros(size, dtype=wide, device=named[0][1].device)
        all_reduce_weighted(zeros, 0.0, group, error=exc, where="ggn_diagonal")
        raise  # (not reached: the line above raises exc)
    if group is not None:  # the shards of every rank (a rank without batches adds zeros)
        local = (
            total if total is not None else torch.zeros(size, dtype=wide, device=named[0][1].device)
        )
        total, count = all_reduce_weighted(local, count, group, where="ggn_diagonal")
        if count == 0:
            total = None
    if total is None:
        raise argument_error("data", "at least one batch with a counted target", data)
    return (total if loss_reduction(loss_fn) == "sum" else total / count).to(named[0][1].dtype)


@dataclass(frozen=True)
class _Diagonal:
    """What :func:`ggn_diagonal` computes: model, loss, selected parameters, settings."""

    model: nn.Module
    loss_fn: LossFn
    named: list[tuple[str, nn.Parameter]]
    method: str
    mc_samples: int
    seed: int
    chunk_size: int
    output_fn: OutputFn | None

    @property
    def names(self) -> list[str]:
        """The selected parameters' names."""
        return [n for n, _ in self.named]


def _local_diagonal(
    setting: _Diagonal, stream: Any, validation: Validation, bn_mode: str | None
) -> tuple[torch.Tensor | None, float]:
    """This rank's :math:`(\\sum_b w_b\\, \\mathrm{diag}_b, \\sum_b w_b)` over ``stream``
    (``None`` when no batch has a counted target); batches of weight 0 are skipped."""
    total: torch.Tensor | None = None
    count = 0.0
    dtype = setting.named[0][1].dtype
    with curvature_mode(setting.model, bn_mode):
        for batch in stream:
            if not stream.is_in_memory:
                validation.check_streamed(batch.inputs, batch.targets, batch.index)
            w = batch_weight(setting.loss_fn, batch.inputs, batch.targets, batch.size)
            if w == 0:
                continue
            with shape_noted(batch, validation.shapes):
                diag = _batch_diagonal(setting, batch)
            diag = diag.to(accumulation_dtype(dtype))  # 16-bit diagonals summed in float32
            total = diag * w if total is None else total.add_(diag, alpha=w)
            count += w
    return total, count


def _batch_diagonal(setting: _Diagonal, batch: Any) -> torch.Tensor:
    """:math:`\\mathrm{diag}_b`, the diagonal of one batch's GGN (or Fisher), flat.

    Raises
    ------
    spectral.errors.NumericalError
        Non-finite model outputs, output factors or diagonal (names the batch, and its
        inputs when they hold NaN or Inf).
    """
    loss_fn, named, names, method = setting.loss_fn, setting.named, setting.names, setting.method
    device, dtype = named[0][1].device, named[0][1].dtype
    inputs = move_to(batch.inputs, device, dtype)
    targets = move_to(batch.targets, device, dtype)
    leaves = [p.detach().requires_grad_(True) for _, p in named]
    recorder = UntrackedUseRecorder(leaves)
    with torch.enable_grad(), recorder:
        out = functional_forward(setting.model, names, leaves, inputs, setting.output_fn)
    recorder.check([out], names=names)
    if method == "mc" and not bool(torch.isfinite(out.detach()).all()):
        raise _non_finite(batch.index, inputs)  # before sampling from NaN probabilities
    if method == "exact":
        factor, signs = output_hessian_factor(loss_fn, out, targets)
        if loss_kind(loss_fn, out, targets) == "ce":  # rank C - 1: one column fewer
            null = torch.softmax(out.detach().reshape(factor.shape[:2]), dim=-1).sqrt()
            factor = drop_null_column(factor, null)
            signs = signs[:, : factor.shape[2]]
    else:
        factor = fisher_output_factor(
            loss_fn,
            out,
            targets,
            kind="mc" if method == "mc" else "empirical",
            mc_samples=setting.mc_samples if method == "mc" else 1,
            generator=batch_generator(setting.seed, batch.index) if method == "mc" else None,
            normaliser=batch_normaliser(loss_fn, inputs, targets, batch.size),
        )
        signs = torch.ones(factor.shape[0], factor.shape[2], dtype=dtype, device=device)
    if not bool(torch.isfinite(factor).all()):  # before the pullbacks compare NaN with NaN
        raise _non_finite(batch.index, inputs)
    diag: torch.Tensor | None = None
    if out.requires_grad and not _batch_coupled(setting.model):
        diag = _sum_squared_per_sample(
            setting.model, names, leaves, inputs, out, factor, signs, setting.output_fn
        )
    if diag is None and out.requires_grad:
        diag = _sum_squared_vjps(out, leaves, factor, signs, setting.chunk_size)
    if diag is None:
        diag = torch.zeros(sum(p.numel() for p in leaves), dtype=dtype, device=device)
    if not bool(torch.isfinite(diag).all()):
        raise _non_finite(batch.index, inputs)
    return diag


def _non_finite(index: int, inputs: Any) -> NumericalError:
    """The error for a batch whose outputs, factors or diagonal are not finite."""
    first = first_tensor(inputs)
    cause = (
        "; the inputs of this batch contain NaN or Inf"
        if first is not None and first.is_floating_point() and not bool(first.isfinite().all())
        else ""
    )
    return NumericalError(f"ggn_diagonal: non-finite values in batch {index}{cause}.")

r"""The other curvature proxies as operators: diagonals, per-layer dense blocks, low rank.

* :func:`diagonal_approximation`: :math:`\operatorname{diag}(G)` of the GGN, exactly
  (``"exact"``), by Monte Carlo (``"mc"``: the diagonal of the MC Fisher, Dangel et al.'s
  DiagGGN-MC), by Hutchinson's estimator on GGN products (``"hutchinson"``), or the
  empirical Fisher's diagonal (``"empirical"``), as a :class:`~curvops.Diagonal`
  (built on :func:`curvops.ggn_diagonal` and :func:`spectral.diagonal`).
* :func:`diagonal_of`: the same for any operator (exact or Hutchinson).
* :func:`layer_blocks`: the exact per-layer blocks (:func:`curvops.per_layer`) as dense
  matrices, a :class:`~curvops.BlockDiagonal` of :class:`~curvops.Dense` whose
  eigenvalues are those of the blocks (:func:`curvops.structure.exact_eigenvalues`).
* :func:`low_rank`: :math:`V_k \Lambda_k V_k^\top` from the converged top-:math:`k`
  eigenpairs (:func:`spectral.top_eigenpairs`), optionally plus the diagonal of the
  remainder :math:`\operatorname{diag}(A) - \sum_i \lambda_i v_i^{\odot 2}`.

All of them are ordinary curvops operators: they compose with the algebra and solvers.

>>> import numpy as np
>>> from curvops.structured import Dense
>>> A = Dense(np.diag([5.0, 2.0, 1.0]), symmetric=True)
>>> L = low_rank(A, 1, seed=0)
>>> np.round(L @ np.array([1.0, 1.0, 1.0]), 8).tolist()
[5.0, 0.0, 0.0]
>>> R = low_rank(A, 1, remainder="exact", seed=0)
>>> np.round(R @ np.array([1.0, 1.0, 1.0]), 8).tolist()
[5.0, 2.0, 1.0]
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from curvops.algebra import BlockDiagonal, add
from curvops.blocks import per_layer
from curvops.curvature import ModelCurvatureOperator
from curvops.diagonal import ggn_diagonal
from curvops.distributed import unwrap_model
from curvops.ggn import GGNOperator
from curvops.kronecker import zero_rounding
from curvops.losses import LossFn
from curvops.operator import CurvatureOperator
from curvops.params import select_params
from curvops.structured import Dense, Diagonal, LowRank
from spectral import diagonal as spectral_diagonal
from spectral import top_eigenpairs
from spectral.errors import argument_error

__all__ = [
    "DIAGONAL_METHODS",
    "ParameterDense",
    "ParameterDiagonal",
    "diagonal_approximation",
    "diagonal_of",
    "layer_blocks",
    "low_rank",
    "make_proxies",
    "make_proxy",
]

DIAGONAL_METHODS = ("exact", "mc", "hutchinson", "empirical")


class _Named:
    """The model parameters a proxy's coordinates stand for (names and shapes, in order).

    With them :func:`curvops.algebra.check_same_parameters` refuses to grade or combine
    the proxy with an operator over other parameters of the same total size.
    """

    _names: list[str]
    _shapes: list[tuple[int, ...]]

    def _set_parameters(self, named: Sequence[tuple[str, Any]]) -> None:
        self._names = [str(n) for n, _ in named]
        self._shapes = [tuple(int(k) for k in p.shape) for _, p in named]

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters, in vector order."""
        return list(self._names)

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the parameters, in vector order (the coordinates' layout)."""
        return list(self._shapes)


class ParameterDiagonal(_Named, Diagonal):
    """A :class:`~curvops.Diagonal` over named model parameters (``named``: ``(name,
    tensor)`` pairs in vector order, or anything with a ``.shape``).

    >>> import torch
    >>> D = ParameterDiagonal(torch.ones(3), [("w", torch.empty(1, 2)), ("b", torch.empty(1))])
    >>> D.param_names, D.param_shapes
    (['w', 'b'], [(1, 2), (1,)])
    """

    def __init__(self, d: Any, named: Sequence[tuple[str, Any]]) -> None:
        super().__init__(d)
        self._set_parameters(named)


class ParameterDense(_Named, Dense):
    """A symmetric :class:`~curvops.Dense` over named model parameters (a layer's block)."""

    def __init__(self, M: Any, named: Sequence[tuple[str, Any]]) -> None:
        super().__init__(M, symmetric=True)
        self._set_parameters(named)


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (Python or numpy integers; not booleans)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise argument_error(name, "an integer >= 1", value)
    return int(value)


def diagonal_of(
    A: CurvatureOperator, *, method: str = "exact", num_matvecs: int = 100, seed: int = 0
) -> Diagonal:
    r""":math:`\operatorname{diag}(A)` as a :class:`~curvops.Diagonal` (``n`` products if exact).

    ``method="hutchinson"``: :math:`\hat d = \frac1M\sum_k \omega_k \odot A\omega_k` with
    ``num_matvecs`` Rademacher probes (:func:`spectral.diagonal`).

    Parameters
    ----------
    A : CurvatureOperator
        A symmetric operator.
    method : str
        ``"exact"`` (``n`` products) or ``"hutchinson"``.
    num_matvecs : int
        Probes for ``"hutchinson"``.
    seed : int
        Seed of the probes.

    Returns
    -------
    Diagonal
        The diagonal as an operator.

    Raises
    ------
    ValueError
        Unknown ``method``, ``num_matvecs < 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Dense
    >>> diagonal_of(Dense(np.array([[2.0, 1.0], [1.0, 3.0]]), symmetric=True)) @ np.ones(2)
    array([2., 3.])
    """
    if method not in ("exact", "hutchinson"):
        raise argument_error("method", "'exact' or 'hutchinson'", method)
    num_matvecs = _positive_int("num_matvecs", num_matvecs)
    d = spectral_diagonal(A, method=method, num_matvecs=num_matvecs, seed=seed)
    return Diagonal(torch.as_tensor(d))


def diagonal_approximation(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    method: str = "exact",
    mc_samples: int = 1,
    num_matvecs: int = 100,
    seed: int = 0,
    params: Any = None,
    bn_mode: str | None = None,
) -> Diagonal:
    """A diagonal proxy of the GGN / Fisher of the mean loss over ``data``.

    Parameters
    ----------
    method:
        ``"exact"`` (GGN diagonal), ``"mc"`` (diagonal of the Monte-Carlo Fisher with
        ``mc_samples`` targets per sample, ``seed``), ``"hutchinson"`` (``num_matvecs``
        GGN products with Rademacher probes, ``seed``) or ``"empirical"`` (empirical
        Fisher diagonal).
    params, bn_mode:
        As for the operators (the model is never changed).

    The entries of ``"exact"``, ``"mc"`` and ``"empirical"`` are sums of squares
    :math:`d_i = \\sum_j a_{ij}^2` of backpropagated vectors, each entry computed on its
    own; as for K-FAC's remainder diagonal (the same quantity,
    :func:`curvops.kronecker.rounding_floor` with size 1), entries with
    :math:`d_i \\le \\varepsilon\\max_j d_j` are zero to working precision and set to
    exactly 0.  A parameter the loss does not see (a bias before a BatchNorm in training
    mode) has :math:`a_{ij} = 0` exactly but computed as rounding noise of relative size
    :math:`\\varepsilon`, so :math:`d_i \\approx \\varepsilon^2\\max d` (measured
    :math:`10^{-33}` relative in float64, :math:`10^{-15}` in float32): without the floor
    :math:`\\log\\det` would be a finite number (:math:`-316`) instead of ``-inf``.
    Entries above :math:`\\varepsilon\\max d` are kept as computed (one of
    :math:`10^{-10}\\max d` in float64 stays).  ``"hutchinson"`` estimates get the same
    floor, which catches product noise below :math:`\\varepsilon\\max|d|` (measured
    :math:`10^{-18}` relative for the BatchNorm case) but not every zero: products of an
    :math:`n \\times n` operator may carry up to :math:`n\\varepsilon\\|A\\|`, and the
    estimate is random.

    Returns
    -------
    ParameterDiagonal
        The diagonal proxy as an operator, over the selected parameters (names and
        shapes, so that :func:`curvops.compare` refuses an operator over others).

    Raises
    ------
    ValueError
        Unknown ``method`` and the errors of :func:`curvops.ggn_diagonal`.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 2).double()
    >>> x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1, 1, 0])
    >>> D = diagonal_approximation(net, torch.nn.CrossEntropyLoss(), (x, y))
    >>> D.shape, D.psd
    ((6, 6), True)
    """
    if method not in DIAGONAL_METHODS:
        raise argument_error("method", " or ".join(repr(m) for m in DIAGONAL_METHODS), method)
    if method == "hutchinson":
        G = GGNOperator(model, loss_fn, data, params=params, bn_mode=bn_mode)
        d = diagonal_of(G, method="hutchinson", num_matvecs=num_matvecs, seed=seed).diagonal
        return ParameterDiagonal(zero_rounding(d, 1), G.params)
    d = ggn_diagonal(
        model,
        loss_fn,
        data,
        method=method,
        mc_samples=mc_samples,
        seed=seed,
        params=params,
        bn_mode=bn_mode,
    )
    # sums of squares: an exactly-zero entry comes out as rounding noise (see docstring)
    return ParameterDiagonal(zero_rounding(d, 1), select_params(unwrap_model(model), params))


def layer_blocks(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    operator_cls: type[ModelCurvatureOperator] = GGNOperator,
    params: Any = None,
    **kwargs: Any,
) -> BlockDiagonal:
    """The exact per-layer blocks as dense matrices (``P_l`` products per layer of size ``P_l``).

    ``operator_cls`` and ``kwargs`` as for :func:`curvops.per_layer`.  The blocks are
    :class:`~curvops.Dense` (symmetrised), so
    :func:`curvops.structure.exact_eigenvalues` gives their eigenvalues and
    :func:`curvops.structure.exact_inverse` their damped inverses.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    loss_fn : callable
        The loss (mean reduction).
    data : batch, sequence of batches or DataLoader
        As for the operators.
    operator_cls : type
        The curvature (default :class:`curvops.GGNOperator`).
    params : optional
        Parameter selection.
    **kwargs
        Passed to each block's operator.

    Returns
    -------
    BlockDiagonal
        :class:`ParameterDense` blocks, one per layer, each over its layer's parameters
        (so that :func:`curvops.compare` refuses an operator over others).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> B = layer_blocks(net, loss, (x, y))
    >>> [b.shape[0] for b in B.blocks]
    [16, 10]
    """
    blocks = per_layer(operator_cls, model, loss_fn, data, params=params, **kwargs)
    dense = [ParameterDense(b.to_dense(), cast(Any, b).params) for b in blocks.blocks]
    return BlockDiagonal(dense)


def low_rank(
    A: CurvatureOperator,
    k: int,
    *,
    remainder: str | None = None,
    which: str = "LA",
    tol: float = 1e-8,
    num_matvecs: int = 100,
    seed: int = 0,
) -> CurvatureOperator:
    r""":math:`V_k\Lambda_k V_k^\top` from ``A``'s converged top-``k`` eigenpairs.

    Parameters
    ----------
    k:
        Number of eigenpairs (``1 <= k < n``).
    remainder:
        ``None``: the low-rank part alone; ``"exact"`` / ``"hutchinson"``: plus
        :math:`\operatorname{diag}(A - V_k\Lambda_k V_k^\top)`, computed with ``n``
        products or estimated with ``num_matvecs`` probes.
    which, tol, seed:
        Passed to :func:`spectral.top_eigenpairs` (``"LA"``: largest algebraic).

    Returns
    -------
    CurvatureOperator
        A :class:`~curvops.LowRank` (plus a :class:`~curvops.Diagonal` remainder when asked).

    Raises
    ------
    ValueError
        Bad ``k``, ``remainder`` or the errors of :func:`spectral.top_eigenpairs`.
    spectral.errors.NumericalError
        The eigenpairs did not converge.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Dense
    >>> A = Dense(np.diag([5.0, 2.0, 1.0]), symmetric=True)
    >>> np.round(low_rank(A, 1, seed=0) @ np.ones(3), 8).tolist()
    [5.0, 0.0, 0.0]
    """
    if remainder not in (None, "exact", "hutchinson"):
        raise argument_error("remainder", "None, 'exact' or 'hutchinson'", remainder)
    k = _positive_int("k", k)
    values, vectors = top_eigenpairs(A, k, which=which, tol=tol, seed=seed)
    V = torch.as_tensor(vectors).to(device=A.device, dtype=A.torch_dtype)
    lam = torch.as_tensor(np.asarray(values), dtype=A.torch_dtype, device=A.device)
    L = LowRank(V, lam)
    if remainder is None:
        return L
    rest = A - L
    d = diagonal_of(rest, method=remainder, num_matvecs=num_matvecs, seed=seed)
    return add(L, d)


_DIAGONAL_SPECS = {"ggn": "exact", "mc": "mc", "hutchinson": "hutchinson", "ef": "empirical"}
_KFAC_OPTIONS = {"expand", "reduce", "mc", "empirical", "type2", "joint"}


def make_proxy(
    spec: str,
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    exact: CurvatureOperator | None = None,
    params: Any = None,
    bn_mode: str | None = None,
    seed: int = 0,
    num_matvecs: int = 100,
    share_with: Any = None,
) -> CurvatureOperator:
    """Build a proxy from its name (the vocabulary of ``curvature compare --approx``).

    ``"kfac"`` / ``"ekfac"`` with optional ``-reduce``, ``-mc``, ``-empirical``, ``-joint``
    suffixes (parameters outside Linear/Conv2d get their diagonal,
    ``remainder="diagonal"``); ``"diag-ggn"``, ``"diag-mc"``, ``"diag-hutchinson"``,
    ``"diag-ef"`` (:func:`diagonal_approximation`); ``"blocks"`` (:func:`layer_blocks`
    of the GGN); ``"low-rank-K"`` and ``"low-rank-K-diag"`` (:func:`low_rank` of
    ``exact``, the latter plus a Hutchinson diagonal of the remainder).

    ``share_with`` (K-FAC/E-KFAC only): an operator with the same settings whose factors
    to reuse (see :class:`curvops.KFACOperator`; :func:`make_proxies` does this).

    Raises
    ------
    ValueError
        An unknown name (``K`` not written in the digits 0-9, both ``-mc`` and
        ``-empirical``), or ``low-rank-K`` without ``exact``.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2).double()
    >>> data = (torch.ones(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]))
    >>> type(make_proxy("kfac-joint", net, torch.nn.CrossEntropyLoss(), data)).__name__
    'KFACOperator'
    """
    from curvops.ekfac import EKFACOperator
    from curvops.kfac import KFACOperator

    if not isinstance(spec, str):
        raise argument_error("spec", "a proxy name such as 'kfac' or 'low-rank-20'", spec)
    parts = spec.lower().split("-")
    if parts[0] in ("kfac", "ekfac") and set(parts[1:]) <= _KFAC_OPTIONS:
        opts = set(parts[1:])
        if {"mc", "empirical"} <= opts:
            raise argument_error(
                "spec", "at most one of the Fisher options '-mc' and '-empirical'", spec
            )
        fisher = "mc" if "mc" in opts else "empirical" if "empirical" in opts else "type2"
        cls = EKFACOperator if parts[0] == "ekfac" else KFACOperator
        return cls(
            model,
            loss_fn,
            data,
            fisher=fisher,
            approx="reduce" if "reduce" in opts else "expand",
            bias="joint" if "joint" in opts else "separate",
            remainder="diagonal",
            params=params,
            bn_mode=bn_mode,
            seed=seed,
            share_with=share_with,
        )
    if parts[0] == "diag" and len(parts) == 2 and parts[1] in _DIAGONAL_SPECS:
        return diagonal_approximation(
            model,
            loss_fn,
            data,
            method=_DIAGONAL_SPECS[parts[1]],
            seed=seed,
            num_matvecs=num_matvecs,
            params=params,
            bn_mode=bn_mode,
        )
    if parts == ["blocks"]:
        return layer_blocks(model, loss_fn, data, params=params, bn_mode=bn_mode)
    if parts[:2] == ["low", "rank"] and len(parts) in (3, 4) and re.fullmatch("[0-9]+", parts[2]):
        if len(parts) == 4 and parts[3] != "diag":
            raise argument_error("spec", "'low-rank-K' or 'low-rank-K-diag'", spec)
        if exact is None:
            raise argument_error("exact", f"the exact operator for {spec!r}", exact)
        remainder = "hutchinson" if len(parts) == 4 else None
        return low_rank(
            exact, int(parts[2]), remainder=remainder, num_matvecs=num_matvecs, seed=seed
        )
    raise argument_error(
        "spec",
        "kfac[-reduce|-mc|-empirical|-joint], ekfac[...], diag-ggn, diag-mc, "
        "diag-hutchinson, diag-ef, blocks, low-rank-K or low-rank-K-diag",
        spec,
    )


def make_proxies(
    specs: Any,
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    **kwargs: Any,
) -> dict[str, CurvatureOperator]:
    """:func:`make_proxy` for each name in ``specs``, sharing work between them.

    ``kfac`` and ``ekfac`` proxies with the same options (``-reduce``, ``-mc``, ...) share
    one computation of the Kronecker factors, their eigendecompositions and the
    remainder diagonal (``share_with``); E-KFAC adds only its eigenvalue correction.

    Parameters
    ----------
    specs : sequence of str
        Proxy names.
    model, loss_fn, data, **kwargs
        As for :func:`make_proxy`.

    Returns
    -------
    dict
        ``name -> operator``, in the order of ``specs``.

    Raises
    ------
    ValueError
        ``specs`` a single string, and the errors of :func:`make_proxy`.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 2).double()
    >>> data = (torch.ones(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]))
    >>> P = make_proxies(["kfac", "ekfac"], net, torch.nn.CrossEntropyLoss(), data)
    >>> bool(torch.allclose(P["kfac"].factors()[0][0], P["ekfac"].factors()[0][0]))
    True
    """
    if isinstance(specs, str):
        raise argument_error("specs", "a sequence of proxy names", specs)
    built: dict[str, CurvatureOperator] = {}
    kronecker: dict[frozenset[str], Any] = {}
    for spec in specs:
        parts = spec.lower().split("-") if isinstance(spec, str) else []
        options = frozenset(parts[1:])
        if parts and parts[0] in ("kfac", "ekfac") and options <= _KFAC_OPTIONS:
            op = make_proxy(spec, model, loss_fn, data, share_with=kronecker.get(options), **kwargs)
            kronecker.setdefault(options, op)
        else:
            op = make_proxy(spec, model, loss_fn, data, **kwargs)
        built[spec] = op
    return built

r"""How far a curvature proxy is from the truth: :func:`compare`, :class:`ApproximationReport`.

Given a proxy :math:`\tilde A` (K-FAC, E-KFAC, a diagonal, blocks, low rank, ...) and the
operator it approximates :math:`A` (both symmetric, ``n x n``), :func:`compare` reports

* the 1-Wasserstein distance :math:`W_1(\mu_A, \mu_{\tilde A}) = \int |F_A - F_{\tilde A}|`
  between the spectral densities (uniform measures on the eigenvalues); each side uses
  its exact eigenvalues when its structure gives them
  (:func:`curvops.structure.exact_eigenvalues`), stochastic Lanczos quadrature
  (:func:`spectral.slq`, ``num_iters``, ``num_probes``, ``seed``) otherwise;
* the relative errors :math:`|\tilde\lambda_i - \lambda_i| / |\lambda_i|` of the top-``k``
  eigenvalues and the principal angles between the top-``k`` eigenspaces (from the
  structure where it gives them, :func:`curvops.structure.exact_top_eigenpairs`, else
  :func:`spectral.top_eigenpairs`; angles from cosines and sines, accurate at both
  ends);
* relative errors :math:`|v^\top\tilde A v - v^\top A v| / |v^\top A v|` of quadratic
  forms on ``num_directions`` Gaussian directions and on the gradient :math:`g`;
* the relative error :math:`\|\tilde x - x\| / \|x\|` of the damped Newton step
  :math:`x = (A + \delta I)^{-1} g` (structured inverses where available, CG/MINRES to
  ``solve_tol`` otherwise: by default :math:`\sqrt\varepsilon` of each side's dtype,
  :func:`default_solve_tol`);
* trace and log-det of both (exact or from the SLQ quadrature:
  :math:`n\sum_i w_i\theta_i`, :math:`n\sum_i w_i \log\theta_i`, ``-inf`` when a node
  is zero to working precision, NaN when it cannot be told from zero, :func:`slq_logdet`)
  and their errors;
* the products each side cost.

The gradient defaults to that of the mean loss when ``exact`` is a model operator
(:class:`curvops.ModelCurvatureOperator`); pass ``gradient=`` otherwise (or none).

>>> import numpy as np
>>> from curvops.structured import Dense, Diagonal
>>> A = Dense(np.array([[2.0, 1.0], [1.0, 2.0]]), symmetric=True)
>>> r = compare(A, A, k=1, gradient=np.ones(2))
>>> r.wasserstein, float(r.top_eigenvalue_errors[0]), r.newton_step_error
(0.0, 0.0, 0.0)
>>> r = compare(Diagonal(np.array([2.0, 2.0])), A, k=1, gradient=np.ones(2))
>>> round(r.wasserstein, 12), round(r.trace_error, 12)
(1.0, 0.0)
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from curvops.algebra import check_same_parameters
from curvops.curvature import ModelCurvatureOperator
from curvops.operator import CurvatureOperator, is_scalar
from curvops.solvers import inverse
from curvops.structure import (
    exact_eigenvalues,
    exact_inverse,
    exact_logdet,
    exact_top_eigenpairs,
    exact_trace,
)
from spectral import SpectralDensity, slq, top_eigenpairs
from spectral.errors import argument_error

logger = logging.getLogger(__name__)

__all__ = ["ApproximationReport", "compare", "compare_all", "default_solve_tol", "slq_logdet"]


@dataclass(frozen=True)
class ApproximationReport:
    """The numbers :func:`compare` measures (``nan`` where a quantity is unavailable).

    The spectra (``spectrum_nodes_*``, ``spectrum_weights_*``) are the measures the
    :math:`W_1` distance compares (exact eigenvalues with equal weights, or SLQ nodes and
    weights).  Eigenvalue arrays are float64, descending; angles in radians, ascending; errors
    are relative unless named otherwise (``logdet_error`` is absolute:
    :math:`\\log\\det` is already a log).

    Attributes
    ----------
    wasserstein : float
        1-Wasserstein distance between the two spectral densities.
    spectrum_exact, spectrum_approximation : str
        How each spectrum was obtained (``"exact"`` or ``"slq"``).
    spectrum_nodes_exact, spectrum_weights_exact : numpy.ndarray
        The exact side's measure.
    spectrum_nodes_approximation, spectrum_weights_approximation : numpy.ndarray
        The proxy's measure.
    top_eigenvalues_exact, top_eigenvalues_approximation, top_eigenvalue_errors : numpy.ndarray
        Top-``k`` eigenvalues (descending) and their relative errors.
    principal_angles : numpy.ndarray
        Between the top-``k`` eigenspaces, radians, ascending.
    quadratic_form_errors, gradient_quadratic_form_error
        Relative errors of :math:`v^\\top A v` on random directions and on the gradient.
    newton_step_error, damping : float
        Relative error of the damped Newton step and the damping used.
    trace_exact, trace_approximation, trace_error : float
        Traces of both sides and the relative error.
    trace_exact_stderr, trace_approximation_stderr : float
        Standard errors of the traces: 0 where a side's trace is exact (its structure
        gives it), the standard error over the SLQ probes where it is estimated as
        n sum_i w_i theta_i per probe, NaN with a single probe (no error
        estimate: then ``trace_error`` may be the estimate's error, not the proxy's).
    logdet_exact, logdet_approximation, logdet_error : float
        Log-determinants of both sides and the absolute error: ``-inf`` for a side
        singular to working precision, NaN for an estimate that cannot tell a null
        eigenvalue from a small one (:func:`slq_logdet`), and then a NaN error.
    products_exact, products_approximation : int
        Products each side cost.

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops import GGNOperator, KFACOperator, compare
    >>> report = compare(KFACOperator(net, loss, (x, y)), GGNOperator(net, loss, (x, y)), k=2,
    ...                  num_iters=10, seed=0)
    >>> type(report).__name__, report.spectrum_approximation, report.spectrum_exact
    ('ApproximationReport', 'exact', 'slq')
    """

    wasserstein: float
    spectrum_exact: str
    spectrum_approximation: str
    spectrum_nodes_exact: np.ndarray
    spectrum_weights_exact: np.ndarray
    spectrum_nodes_approximation: np.ndarray
    spectrum_weights_approximation: np.ndarray
    top_eigenvalues_exact: np.ndarray
    top_eigenvalues_approximation: np.ndarray
    top_eigenvalue_errors: np.ndarray
    principal_angles: np.ndarray
    quadratic_form_errors: np.ndarray
    gradient_quadratic_form_error: float
    newton_step_error: float
    damping: float
    trace_exact: float
    trace_approximation: float
    trace_error: float
    logdet_exact: float
    logdet_approximation: float
    logdet_error: float
    products_exact: int
    products_approximation: int
    trace_exact_stderr: float = math.nan
    trace_approximation_stderr: float = math.nan

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy array (``np.savez``-ready, ``allow_pickle=False``)."""
        return {key: np.asarray(value) for key, value in asdict(self).items()}


class _Counted(CurvatureOperator):
    """Delegates to ``base`` and counts the columns it is applied to."""

    def __init__(self, base: CurvatureOperator) -> None:
        super().__init__(
            shape=base.shape,
            torch_dtype=base.torch_dtype,
            device=base.device,
            symmetric=base.symmetric,
            psd=base.psd,
        )
        self.base = base
        self.count = 0

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.count += int(X.shape[1])
        return self.base._matmat_torch(X)


def _relative(approx: float, exact: float) -> float:
    if exact == 0.0:
        return 0.0 if approx == 0.0 else math.inf
    return abs(approx - exact) / abs(exact)


def _spectrum(
    A: CurvatureOperator, counted: _Counted, num_iters: int, num_probes: int, seed: int
) -> tuple[SpectralDensity, str]:
    values = exact_eigenvalues(A)
    if values is not None:
        v = values.detach().cpu().to(torch.float64).numpy()
        return SpectralDensity(v, np.full(v.shape, 1.0 / v.size)), "exact"
    m = min(num_iters, A.shape[0])
    return slq(counted, m, num_probes=num_probes, seed=seed), "slq"


def _principal_angles(V: torch.Tensor, W: torch.Tensor) -> np.ndarray:
    """Angles between the column spaces of orthonormal ``V`` and ``W`` (ascending)."""
    V64, W64 = V.to(torch.float64), W.to(torch.float64)
    Q, _ = torch.linalg.qr(W64)
    P, _ = torch.linalg.qr(V64)
    cosines = torch.linalg.svdvals(P.T @ Q).clamp(0.0, 1.0).cpu().numpy()  # descending
    sines = torch.linalg.svdvals(Q - P @ (P.T @ Q)).clamp(0.0, 1.0).cpu().numpy()
    sines = np.sort(sines)  # ascending, matching the descending cosines
    angles = np.where(sines < math.sqrt(0.5), np.arcsin(sines), np.arccos(cosines))
    return np.sort(angles)


def _damped_solve(
    A: CurvatureOperator, counted: _Counted, damping: float, g: torch.Tensor, tol: float
) -> torch.Tensor:
    structured = exact_inverse(A, damping)
    if structured is not None:
        return torch.as_tensor(structured @ g)
    method = "cg" if A.psd else "minres"
    solver = inverse(counted.damp(damping), method, tol=tol, strict=True)
    return torch.as_tensor(solver @ g)


def _check_operator(name: str, op: Any, n: int | None) -> None:
    if not isinstance(op, CurvatureOperator) or not op.symmetric:
        raise argument_error(name, "a symmetric curvops operator", op, kind=TypeError)
    if n is not None and op.shape != (n, n):
        raise argument_error(name, f"an operator of shape {(n, n)}", op)


@dataclass
class _Side:
    """Everything measured on one operator."""

    density: SpectralDensity
    source: str
    top_values: np.ndarray  # descending
    top_vectors: torch.Tensor
    quadratic_forms: np.ndarray
    gradient_form: float
    step: torch.Tensor | None
    trace: float
    logdet: float
    products: int
    trace_stderr: float


def _trace_stderr(density: SpectralDensity, n: int) -> float:
    """Standard error of :math:`n \\sum_i w_i \\theta_i` over the probes (NaN: one probe)."""
    nodes, weights = density.probe_nodes, density.probe_weights
    if nodes is None or weights is None or nodes.shape[0] < 2:
        return math.nan
    per_probe = n * np.nansum(nodes * weights, axis=1)
    return float(np.std(per_probe, ddof=1) / math.sqrt(per_probe.size))


def slq_logdet(density: SpectralDensity, n: int, dtype: torch.dtype) -> float:
    """:math:`n\\sum_i w_i\\log\\theta_i` over SLQ nodes; ``-inf`` if a node is zero or below,
    NaN if the smallest node cannot be told from zero.

    A node :math:`|\\theta| \\le m\\,\\varepsilon\\max|\\theta|` (``m`` nodes per probe,
    :math:`\\varepsilon` of the operator's ``dtype``) is zero to working precision: the
    nodes are the eigenvalues of the :math:`m \\times m` Lanczos matrix :math:`T_m`, which
    ``eigh`` computes to :math:`m\\varepsilon\\|T_m\\|` (backward stable, Weyl), and
    :math:`T_m` is :math:`Q^\\top A Q` up to the rounding of the :math:`m` products;
    :math:`\\max|\\theta| \\approx \\|A\\|` since the extreme Ritz values converge first.
    Such a node means the probe's Krylov space holds a null vector of :math:`A` to working
    precision, so :math:`A` is singular (or indefinite when a node is negative) and the
    estimate is ``-inf``, as :func:`curvops.structure.exact_logdet` says for exact
    eigenvalues; the log of a :math:`10^{-17}` node would be a finite number.

    Above that floor but below :math:`m\\sqrt n\\,\\varepsilon\\max|\\theta|` the estimate
    is NaN (logged as a warning): there a null eigenvalue and a small positive one cannot be
    told apart.  A product of an ``n x n`` operator sums ``n`` rounded terms and carries an
    error of about :math:`\\sqrt n\\,\\varepsilon` times the norms of its factors (Higham
    and Mary's probabilistic bound), which for a GGN :math:`J^\\top HJ` exceed
    :math:`\\|A\\|` (the logits' shift direction, which the softmax's :math:`H`
    annihilates, is rounded too); and the smallest Gauss node converges to an eigenvalue 0
    from above, so after few steps it is still positive.  Measured in float32: the
    rank-900 GGN of a 26,122-parameter MLP gave a smallest node of 2.5e-5 with weight 0.99
    (1.3 times the first floor; the finite estimate -274,935 for a log-det of ``-inf``),
    and a 19,210-parameter one 1.5e-6 after 10 steps (``m = 20``: -5e-10).

    >>> d = SpectralDensity(np.array([2.5e-17, 4.0]), np.array([0.25, 0.75]))
    >>> slq_logdet(d, 4, torch.float64)
    -inf
    >>> round(slq_logdet(SpectralDensity(np.array([1e-10, 4.0]), np.array([0.5, 0.5])), 2,
    ...                  torch.float64), 6)
    -21.639557
    >>> slq_logdet(SpectralDensity(np.array([1e-6, 1.0]), np.array([0.5, 0.5])), 10**4,
    ...            torch.float32)
    nan
    """
    nodes, weights = density.nodes, density.weights
    if nodes.size == 0:
        return 0.0
    probes = density.probe_nodes
    m = int(probes.shape[1]) if probes is not None else int(nodes.size)
    eps = float(torch.finfo(dtype).eps)
    top, smallest = float(np.abs(nodes).max()), float(nodes.min())
    if smallest <= m * eps * top:
        return -math.inf
    resolution = m * math.sqrt(n) * eps * top
    if smallest <= resolution:
        logger.warning(
            "slq_logdet: the smallest SLQ node %.3e is within m sqrt(n) eps max|theta| = %.3e "
            "of 0 (%s products): a null eigenvalue cannot be told from a small one, the "
            "log-determinant is not determined (NaN)",
            smallest,
            resolution,
            dtype,
        )
        return math.nan
    return n * float(np.sum(weights * np.log(nodes)))


def default_solve_tol(dtype: torch.dtype) -> float:
    """:math:`\\sqrt\\varepsilon` of ``dtype``: the default relative-residual tolerance of
    the Newton-step solves (``1.5e-8`` in float64, ``3.5e-4`` in float32).

    A Krylov solve of :math:`(A + \\delta I)x = g` in floating point stalls at a
    relative residual of about :math:`\\varepsilon\\kappa` (:mod:`curvops.solvers`), and
    stopping at ``tol`` leaves a relative error of at most :math:`\\kappa\\,\\mathrm{tol}` in
    :math:`x`.  :math:`\\sqrt\\varepsilon` is reachable for :math:`\\kappa \\le
    \\varepsilon^{-1/2}` (2896 in float32, :math:`6.7\\cdot 10^7` in float64), which the
    default damping :math:`\\delta = 10^{-3}\\lambda_{\\max}` guarantees for a psd operator
    (:math:`\\kappa \\le 1001`); a fixed ``1e-8`` is below float32's
    :math:`\\varepsilon\\kappa` and the solve could never converge.  For smaller dampings
    pass ``solve_tol`` (at least about :math:`\\varepsilon\\kappa`).

    >>> default_solve_tol(torch.float32) == float(np.finfo(np.float32).eps) ** 0.5
    True
    """
    return math.sqrt(float(torch.finfo(dtype).eps))


def _measure(
    A: CurvatureOperator,
    *,
    k: int,
    num_iters: int,
    num_probes: int,
    V: torch.Tensor,
    g: torch.Tensor | None,
    damping: float | None,
    eig_tol: float,
    solve_tol: float | None,
    seed: int,
    known_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[_Side, float]:
    n = A.shape[0]
    counted = _Counted(A)
    density, source = _spectrum(A, counted, num_iters, num_probes, seed)
    pairs = exact_top_eigenpairs(A, k) if known_pairs is None else known_pairs
    if pairs is not None:
        top = pairs[0].detach().to(torch.float64).cpu().numpy()
        vecs: Any = pairs[1]
    else:
        vals, vecs = top_eigenpairs(counted, k, which="LA", tol=eig_tol, seed=seed)
        top = np.asarray(vals, dtype=np.float64)[::-1].copy()
        vecs = torch.as_tensor(vecs).flip(1)  # descending, as the values
    Vd = V.to(A.device, A.torch_dtype)
    quad = (Vd * torch.as_tensor(counted @ Vd)).sum(0).double().cpu().numpy()
    delta = float(damping) if damping is not None else 1e-3 * max(float(top[0]), 0.0)
    g_form, step = math.nan, None
    if g is not None:
        gd = g.to(A.device, A.torch_dtype)
        g_form = float(gd @ torch.as_tensor(counted @ gd))
        if delta > 0 or A.psd:
            tol = default_solve_tol(A.torch_dtype) if solve_tol is None else solve_tol
            step = _damped_solve(A, counted, delta, gd, tol).to(torch.float64).cpu()
    tr, ld = exact_trace(A), exact_logdet(A)
    tr_stderr = 0.0
    if tr is None:
        tr = n * float(density.moment(1))
        tr_stderr = _trace_stderr(density, n)
    if ld is None:
        ld = slq_logdet(density, n, A.torch_dtype)
    side = _Side(
        density,
        source,
        top,
        torch.as_tensor(vecs).to(torch.float64).cpu(),
        quad,
        g_form,
        step,
        tr,
        ld,
        counted.count,
        tr_stderr,
    )
    return side, delta


def _integer(name: str, value: Any, low: int, below: int | None) -> int:
    """``value`` as an int in ``[low, below)`` (Python or numpy integers, not booleans)."""
    bound = f"{low} <= {name} < {below}" if below is not None else f"{name} >= {low}"
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise argument_error(name, f"an integer with {bound}", value)
    number = int(value)
    if number < low or (below is not None and number >= below):
        raise argument_error(name, f"an integer with {bound}", value)
    return number


def _gradient(gradient: Any, n: int) -> torch.Tensor:
    """``gradient`` as a finite real vector of length ``n`` (numpy, torch or a sequence)."""
    expected = f"a finite real vector of length {n} (numpy or torch)"
    try:
        g = (
            gradient
            if isinstance(gradient, torch.Tensor)
            else torch.as_tensor(np.asarray(gradient))
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise argument_error("gradient", expected, gradient, kind=TypeError) from err
    if g.is_complex() or g.dtype == torch.bool:
        raise argument_error("gradient", expected, gradient, kind=TypeError)
    if g.ndim != 1 or g.shape[0] != n:
        raise argument_error("gradient", expected, gradient)
    if not bool(torch.isfinite(g).all()):
        raise argument_error("gradient", "a vector of finite entries (no NaN or Inf)", gradient)
    return g


def _top_pairs(pairs: Any, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of given eigenpairs, values descending (``exact_pairs`` of compare_all)."""
    try:
        values, vectors = pairs
        values = torch.as_tensor(
            np.asarray(values) if not isinstance(values, torch.Tensor) else values
        )
        vectors = torch.as_tensor(
            np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors
        )
    except (TypeError, ValueError) as err:
        raise argument_error("exact_pairs", "a (values, vectors) pair", type(pairs)) from err
    if values.ndim != 1 or vectors.shape != (n, values.shape[0]) or values.shape[0] < k:
        raise argument_error(
            "exact_pairs",
            f"(values (r,), vectors ({n}, r)) with r >= k = {k}",
            tuple(vectors.shape),
        )
    order = torch.argsort(values.to(torch.float64), descending=True)[:k]
    return values[order], vectors[:, order]


def _report(a: _Side, e: _Side, delta: float) -> ApproximationReport:
    if a.step is not None and e.step is not None:
        norm = float(torch.linalg.vector_norm(e.step))
        diff = float(torch.linalg.vector_norm(a.step - e.step))
        newton = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    else:
        newton = math.nan
    if math.isnan(a.logdet) or math.isnan(e.logdet):  # a side's log-det is not determined
        ld_err = math.nan
    elif math.isfinite(a.logdet) and math.isfinite(e.logdet):
        ld_err = abs(a.logdet - e.logdet)
    else:
        ld_err = 0.0 if a.logdet == e.logdet else math.inf
    g_err = (
        _relative(a.gradient_form, e.gradient_form) if math.isfinite(e.gradient_form) else math.nan
    )
    return ApproximationReport(
        wasserstein=float(a.density.wasserstein(e.density)),
        spectrum_exact=e.source,
        spectrum_approximation=a.source,
        spectrum_nodes_exact=e.density.nodes.copy(),
        spectrum_weights_exact=e.density.weights.copy(),
        spectrum_nodes_approximation=a.density.nodes.copy(),
        spectrum_weights_approximation=a.density.weights.copy(),
        top_eigenvalues_exact=e.top_values,
        top_eigenvalues_approximation=a.top_values,
        top_eigenvalue_errors=np.array(
            [_relative(x, y) for x, y in zip(a.top_values, e.top_values)]
        ),
        principal_angles=_principal_angles(e.top_vectors, a.top_vectors),
        quadratic_form_errors=np.array(
            [_relative(x, y) for x, y in zip(a.quadratic_forms, e.quadratic_forms)]
        ),
        gradient_quadratic_form_error=g_err,
        newton_step_error=newton,
        damping=delta,
        trace_exact=e.trace,
        trace_approximation=a.trace,
        trace_error=_relative(a.trace, e.trace),
        trace_exact_stderr=e.trace_stderr,
        trace_approximation_stderr=a.trace_stderr,
        logdet_exact=e.logdet,
        logdet_approximation=a.logdet,
        logdet_error=ld_err,
        products_exact=e.products,
        products_approximation=a.products,
    )


def compare_all(
    approximations: Mapping[str, CurvatureOperator],
    exact: CurvatureOperator,
    *,
    k: int = 10,
    num_iters: int = 50,
    num_probes: int = 1,
    num_directions: int = 10,
    gradient: Any = None,
    damping: float | None = None,
    eig_tol: float = 1e-6,
    solve_tol: float | None = None,
    seed: int = 0,
    exact_pairs: Any = None,
    exact_trace: float | None = None,
) -> dict[str, ApproximationReport]:
    """:func:`compare` for several proxies, measuring the exact side once.

    Each report's ``products_exact`` is the (shared) cost of the exact side.
    ``exact_pairs``: ``(values, vectors)``, at least ``k`` top eigenpairs of ``exact``
    already converged to ``eig_tol`` or better (e.g. those a :func:`curvops.proxies.low_rank`
    proxy of ``exact`` was built from: :attr:`LowRank.weights <curvops.LowRank.weights>`,
    :attr:`~curvops.LowRank.factor`), used instead of computing them again (their
    products are then not counted in ``products_exact``).  ``exact_trace``: the exact
    trace of ``exact`` when it is known otherwise (the sum of the exact GGN diagonal,
    :func:`curvops.ggn_diagonal`), used instead of the SLQ estimate (whose standard
    error with few probes can exceed the proxies' errors).

    Parameters
    ----------
    approximations : Mapping[str, CurvatureOperator]
        The proxies, by name.
    exact : CurvatureOperator
        The operator they approximate.
    k, num_iters, num_probes, num_directions, gradient, damping, eig_tol, solve_tol, seed
        As for :func:`compare`.

    Returns
    -------
    dict
        ``name -> ApproximationReport``.

    Raises
    ------
    TypeError, ValueError
        As :func:`compare`; an empty mapping.

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops import EKFACOperator, GGNOperator, KFACOperator
    >>> proxies = {"kfac": KFACOperator(net, loss, (x, y)),
    ...            "ekfac": EKFACOperator(net, loss, (x, y))}
    >>> reports = compare_all(proxies, GGNOperator(net, loss, (x, y)), k=2, num_iters=10, seed=0)
    >>> sorted(reports)
    ['ekfac', 'kfac']
    """
    _check_operator("exact", exact, None)
    n = exact.shape[0]
    if not isinstance(approximations, Mapping) or not approximations:
        raise argument_error(
            "approximations", "a non-empty mapping name -> operator", approximations
        )
    for name, op in approximations.items():
        _check_operator(f"approximations[{name!r}]", op, n)
        check_same_parameters(exact, op, f"approximations[{name!r}]")
    k = _integer("k", k, 1, n)
    num_directions = _integer("num_directions", num_directions, 1, None)
    if damping is not None and not (is_scalar(damping) and 0 <= damping < math.inf):
        raise argument_error("damping", "a finite real number >= 0", damping)
    if solve_tol is not None and not (is_scalar(solve_tol) and 0 < solve_tol < math.inf):
        raise argument_error("solve_tol", "None or a finite real number > 0", solve_tol)
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral):
        raise argument_error("seed", "an integer", seed, kind=TypeError)
    seed = int(seed)
    g: torch.Tensor | None = None
    if gradient is not None:
        g = _gradient(gradient, n)
    elif isinstance(exact, ModelCurvatureOperator):
        g = exact.loss_gradient()
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(n, num_directions, generator=gen, dtype=torch.float64)
    settings: dict[str, Any] = {
        "k": k,
        "num_iters": num_iters,
        "num_probes": num_probes,
        "V": V,
        "g": g,
        "eig_tol": eig_tol,
        "solve_tol": solve_tol,
        "seed": seed,
    }
    known = _top_pairs(exact_pairs, k, n) if exact_pairs is not None else None
    e, delta = _measure(exact, damping=damping, known_pairs=known, **settings)
    if exact_trace is not None:
        if not (is_scalar(exact_trace) and math.isfinite(float(exact_trace))):
            raise argument_error("exact_trace", "None or a finite real number", exact_trace)
        e.trace, e.trace_stderr = float(exact_trace), 0.0
    reports = {}
    for name, op in approximations.items():
        a, _ = _measure(op, damping=delta, **settings)
        reports[name] = _report(a, e, delta)
    return reports


def compare(
    approximation: CurvatureOperator,
    exact: CurvatureOperator,
    *,
    k: int = 10,
    num_iters: int = 50,
    num_probes: int = 1,
    num_directions: int = 10,
    gradient: Any = None,
    damping: float | None = None,
    eig_tol: float = 1e-6,
    solve_tol: float | None = None,
    seed: int = 0,
) -> ApproximationReport:
    """Grade ``approximation`` against ``exact`` (see the module docstring).

    Parameters
    ----------
    k:
        Number of top eigenpairs compared (``1 <= k < n``; a Python or numpy integer).
    num_iters, num_probes:
        SLQ iterations (capped at ``n``) and probes for a side without exact eigenvalues.
    num_directions:
        Gaussian directions for the quadratic forms.
    gradient:
        The vector :math:`g` (length ``n``, finite, numpy or torch); default: the mean-loss
        gradient when ``exact`` is a model operator (its
        :meth:`~curvops.ModelCurvatureOperator.loss_gradient`: batches weighted by the
        loss's own normaliser), else no gradient measures (``nan``).
    damping:
        :math:`\\delta` of the Newton step; default :math:`10^{-3}\\lambda_{\\max}(A)`.
    eig_tol, solve_tol:
        Tolerances of :func:`spectral.top_eigenpairs` and of the iterative solves
        (relative residual; ``None``: :func:`default_solve_tol`, :math:`\\sqrt\\varepsilon`
        of each side's dtype, reachable in float32 where ``1e-8`` is not).
    seed:
        An integer (Python or numpy); seeds the SLQ probes, the eigensolver start
        vectors and the directions (the same on both sides, so ``compare(A, A)``
        reports zeros).

    Returns
    -------
    ApproximationReport
        The measured numbers (``nan`` where unavailable).

    Raises
    ------
    TypeError
        Operands that are not symmetric curvops operators; a ``seed`` that is not an
        integer; a ``gradient`` that is not a real array.
    ValueError
        Shapes that differ, bad ``k``, ``num_directions``, ``damping``, ``solve_tol`` or
        ``gradient`` (wrong length, NaN or Inf entries).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops import GGNOperator, KFACOperator
    >>> r = compare(KFACOperator(net, loss, (x, y)), GGNOperator(net, loss, (x, y)), k=2,
    ...             num_iters=10, seed=0)
    >>> r.top_eigenvalue_errors.shape, bool(r.wasserstein >= 0.0)
    ((2,), True)
    """
    _check_operator("approximation", approximation, None)
    _check_operator("exact", exact, None)
    if approximation.shape != exact.shape:
        raise argument_error("approximation", f"an operator of shape {exact.shape}", approximation)
    check_same_parameters(exact, approximation, "approximation")
    return compare_all(
        {"approximation": approximation},
        exact,
        k=k,
        num_iters=num_iters,
        num_probes=num_probes,
        num_directions=num_directions,
        gradient=gradient,
        damping=damping,
        eig_tol=eig_tol,
        solve_tol=solve_tol,
        seed=seed,
    )["approximation"]

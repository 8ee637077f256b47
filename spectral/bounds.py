r"""Certified bounds from Gauss quadrature, and confidence bands from the probe average.

Quadrature bounds (deterministic, one probe)
--------------------------------------------
Let :math:`\mu` be a probability measure on :math:`\mathbb{R}` with distribution function
:math:`F(x) = \mu((-\infty, x])`, and let :math:`\theta_1 < \dots < \theta_m` and
:math:`\tau_1, \dots, \tau_m` be the nodes and weights of its ``m``-point Gauss quadrature
rule, with partial sums :math:`C_0 = 0`, :math:`C_k = \tau_1 + \dots + \tau_k`. The
Chebyshev–Markov–Stieltjes inequalities (Szegő, *Orthogonal Polynomials*, Thm 3.41.1;
Karlin & Studden, Ch. II; Chen, Trogdon & Ubaru 2021, Lemma 4.1) state that at every node

.. math:: C_{k-1} \;\le\; F(\theta_k^-) \;\le\; F(\theta_k) \;\le\; C_k .

Since :math:`F` is non-decreasing, for any :math:`x` with :math:`k = \#\{i: \theta_i \le x\}`
and :math:`k' = \#\{i: \theta_i < x\}`,

.. math:: L(x) = C_{\max(k-1,\,0)} \;\le\; F(x) \;\le\; C_{\min(k'+1,\,m)} = U(x):

below, the mass strictly left of the node at or below ``x``; above, the mass up to and
including the next node at or above ``x``. At a node (``x = θ_k``) the bounds are
:math:`[C_{k-1}, C_k]`; strictly between :math:`\theta_k` and :math:`\theta_{k+1}` they are
:math:`[C_{k-1}, C_{k+1}]` (two weights wide — the upper bound :math:`C_k` would be wrong
there). When the Krylov space of the probe is invariant (Lanczos breakdown) the rule *is* the
measure and :math:`F(x) = C_{\#\{\theta_i \le x\}}`: the bounds coincide.

SLQ measures: for a probe ``v`` the measure is
:math:`\mu_v = \sum_j (u_j^\top v)^2/\|v\|^2\,\delta_{\lambda_j}`, whose distribution function
is :math:`F_v(x) = v^\top \mathbf 1[A \le x]\, v/\|v\|^2`; ``m`` Lanczos steps from ``v`` give
its Gauss rule (Ritz values, squared first components of the eigenvectors of :math:`T_m`).

Rounding: the computed nodes are those of a nearby problem, accurate to a few
:math:`\varepsilon\|A\|`, and an early stop drops a residual :math:`\beta \le
\sqrt{\varepsilon}\,\|A\|`. :func:`quadrature_cdf_bounds` therefore evaluates the bounds at
:math:`x \mp \delta` (``tol``, absolute, in the units of ``x``) and widens them by
:math:`\eta` in probability (``probability_tol``; the weights are first components of
eigenvectors of a tridiagonal matrix known to the same relative accuracy
:math:`\delta/\max|\theta|`, and never below :data:`PROBABILITY_TOL`):
:math:`\ell(x) = L(x-\delta) - \eta`, :math:`u(x) = U(x+\delta) + \eta`, clipped to ``[0, 1]``.

Quantile form (used for functionals): every measure satisfying the inequalities above with
support in :math:`[a, b]` has quantile function :math:`Q(s) \in [\theta_{k-1}, \theta_{k+1}]`
for :math:`s \in (C_{k-1}, C_k]` (with :math:`\theta_0 = a`, :math:`\theta_{m+1} = b`), hence

.. math:: \sum_k \tau_k \min_{[\theta_{k-1},\theta_{k+1}]} f \;\le\; \int f\,d\mu
          \;\le\; \sum_k \tau_k \max_{[\theta_{k-1},\theta_{k+1}]} f

for every bounded ``f`` (:func:`quadrature_expectation_bounds`).

Concentration over probes (random, pointwise)
---------------------------------------------
For the spectral distribution function :math:`F(x) = \#\{\lambda_j \le x\}/n =
\mathrm{tr}\,\Pi_x / n` (:math:`\Pi_x = \mathbf 1[A \le x]`, an orthogonal projector of rank
:math:`r = nF`), :math:`F_v(x)` is unbiased and

* Rademacher probes (:math:`\|v\|^2 = n`): :math:`\mathrm{Var}\,F_v = 2\sum_{i\ne j}
  \Pi_{ij}^2 / n^2 = 2(\mathrm{tr}\,\Pi - \sum_i \Pi_{ii}^2)/n^2 \le 2F(1-F)/n`
  (:math:`\sum_i\Pi_{ii}^2 \ge (\mathrm{tr}\,\Pi)^2/n`);
* Gaussian or spherical probes: :math:`F_v \sim \mathrm{Beta}(r/2, (n-r)/2)`, so
  :math:`\mathrm{Var}\,F_v = 2F(1-F)/(n+2)`.

With :math:`\bar F = \frac1P\sum_k F_{v_k}` over ``P`` independent probes, Chebyshev's
inequality gives :math:`\Pr[(\bar F - F)^2 > cF(1-F)] \le \alpha` for
:math:`c = \kappa/(P\alpha)`, :math:`\kappa = 2/n` (Rademacher) or :math:`2/(n+2)`
(Gaussian, sphere). Inverting the quadratic inequality in :math:`F` (as for a Wilson
interval) and using :math:`\bar L(x) \le \bar F(x) \le \bar U(x)` (the probe means of the
quadrature bounds) gives a band :math:`[\ell(x), u(x)]` that contains :math:`F(x)` with
probability at least :math:`1 - \alpha` **for each fixed x** (pointwise;
:func:`wilson_chebyshev` with ``simultaneous`` Bonferroni-corrects over the points asked).
This is the variance argument of Chen, Trogdon & Ubaru (2021), "Analysis of stochastic
Lanczos quadrature for spectrum approximation", ICML, with the exact variance of a
projector's quadratic form instead of a Hoeffding bound that ignores ``n``.

For a bounded ``f`` on :math:`[a, b]` with oscillation :math:`\omega = \sup f - \inf f`,
:math:`\mathrm{Var}(v^\top f(A) v/\|v\|^2) \le \omega^2/(2n)` (Rademacher; shift ``f`` by
its mid-range, :math:`\|f(A) - cI\|_F^2 \le n\omega^2/4`) or :math:`\omega^2/(2(n+2))`
(Gaussian, sphere), and Chebyshev adds :math:`\pm\omega/\sqrt{2nP\alpha}` to the quadrature
interval (:func:`chebyshev_halfwidth`).

>>> lo, hi = quadrature_cdf_bounds([0.0, 1.0, 2.0], [0.25, 0.5, 0.25], [0.5, 1.0])
>>> lo.round(6).tolist(), hi.round(6).tolist()
([0.0, 0.25], [0.75, 0.75])
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from spectral.errors import argument_error, check_integer, check_real

__all__ = [
    "PROBABILITY_TOL",
    "PROBE_VARIANCE",
    "chebyshev_halfwidth",
    "probe_variance_factor",
    "quadrature_cdf_bounds",
    "quadrature_expectation_bounds",
    "wilson_chebyshev",
]

FloatArray = NDArray[np.float64]

#: Widening in probability of every quadrature bound (rounding in the weights and their sums).
PROBABILITY_TOL = 1e-10

#: Probe distributions for which the concentration bounds hold, and their variance factor
#: ``κ·n`` (``Var F_v ≤ κ F(1 - F)`` with ``κ = 2/n`` or ``2/(n + 2)``).
PROBE_VARIANCE = {"rademacher": 0, "gaussian": 2, "sphere": 2}


def probe_variance_factor(kind: str, n: int) -> float:
    r"""Return :math:`\kappa` with :math:`\mathrm{Var}\,F_v(x) \le \kappa F(1-F)` for a probe.

    ``2/n`` for Rademacher probes, ``2/(n + 2)`` for Gaussian and spherical probes.

    Parameters
    ----------
    kind : str
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
    n : int
        Dimension of the operator.

    Returns
    -------
    float
        The factor :math:`\kappa`.

    Examples
    --------
    >>> probe_variance_factor("rademacher", 100), probe_variance_factor("sphere", 98)
    (0.02, 0.02)
    """
    if kind not in PROBE_VARIANCE:
        raise argument_error(
            "probe_distribution", f"one of {tuple(PROBE_VARIANCE)} (random probes)", kind
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise argument_error("n", "a positive integer (the operator's dimension)", n)
    return 2.0 / (int(n) + PROBE_VARIANCE[kind])


def quadrature_cdf_bounds(
    nodes: ArrayLike,
    weights: ArrayLike,
    x: ArrayLike,
    *,
    invariant: bool = False,
    tol: float = 0.0,
    probability_tol: float = PROBABILITY_TOL,
) -> tuple[FloatArray, FloatArray]:
    r"""Chebyshev–Markov–Stieltjes bounds on :math:`F(x)` from one Gauss quadrature rule.

    Parameters
    ----------
    nodes, weights:
        The rule: 1-D, same length ``m``, weights non-negative summing to 1 (NaN entries,
        the padding of an early-stopped probe, are dropped).
    x:
        Points (any shape).
    invariant:
        The rule is the measure itself (invariant Krylov space): :math:`F(x) = C_{\#\{\theta_i
        \le x\}}`, evaluated at :math:`x \mp \delta`.
    tol:
        :math:`\delta \ge 0`, the absolute accuracy of the nodes (see the module docstring).
    probability_tol:
        :math:`\eta \ge 0`, the accuracy of the partial sums of the weights.

    Returns
    -------
    lower, upper:
        float64 arrays of the shape of ``x`` with
        :math:`L(x-\delta) - \eta \le F(x) \le U(x+\delta) + \eta`, clipped to ``[0, 1]``;
        NaN where ``x`` is NaN.

    Examples
    --------
    >>> lo, hi = quadrature_cdf_bounds([1.0, 2.0], [0.5, 0.5], [1.5], invariant=True)
    >>> lo.round(6).tolist(), hi.round(6).tolist()
    ([0.5], [0.5])
    """
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    tau = np.asarray(weights, dtype=np.float64).reshape(-1)
    if theta.shape != tau.shape:
        raise argument_error("weights", f"an array of shape {theta.shape}", weights)
    keep = ~np.isnan(theta)
    theta, tau = theta[keep], tau[keep]
    if theta.size == 0:
        raise argument_error("nodes", "at least one node", nodes)
    if not (np.isfinite(tol) and tol >= 0):
        raise argument_error("tol", "a non-negative number", tol)
    order = np.argsort(theta, kind="stable")
    theta, tau = theta[order], tau[order]
    m = theta.size
    cumulative = np.concatenate([[0.0], np.cumsum(tau)])
    cumulative[-1] = 1.0
    xs = np.asarray(x, dtype=np.float64)
    below = np.searchsorted(theta, xs - tol, side="right")  # #{θ_i <= x - δ}
    if invariant:
        lower = cumulative[below]
        upper = cumulative[np.searchsorted(theta, xs + tol, side="right")]
    else:
        lower = cumulative[np.maximum(below - 1, 0)]
        strictly = np.searchsorted(theta, xs + tol, side="left")  # #{θ_i < x + δ}
        upper = cumulative[np.minimum(strictly + 1, m)]
    if not (np.isfinite(probability_tol) and probability_tol >= 0):
        raise argument_error("probability_tol", "a non-negative number", probability_tol)
    undefined = np.isnan(xs)  # searchsorted puts NaN past every node: F(NaN) = 1 otherwise
    lo: FloatArray = np.where(undefined, np.nan, np.clip(lower - probability_tol, 0.0, 1.0))
    hi: FloatArray = np.where(undefined, np.nan, np.clip(upper + probability_tol, 0.0, 1.0))
    return lo, hi


def quadrature_expectation_bounds(
    nodes: ArrayLike,
    weights: ArrayLike,
    values_on: object,
    support: tuple[float, float],
    *,
    invariant: bool = False,
    tol: float = 0.0,
    resolution: int = 33,
) -> tuple[float, float]:
    r"""Bounds on :math:`\int f\,d\mu` from the Gauss rule of :math:`\mu` (support in ``[a, b]``).

    :math:`\sum_k \tau_k \min_{J_k} f \le \int f\,d\mu \le \sum_k \tau_k \max_{J_k} f` with
    :math:`J_k = [\theta_{k-1} - \delta, \theta_{k+1} + \delta]` (:math:`\theta_0 = a`,
    :math:`\theta_{m+1} = b`), or :math:`J_k = [\theta_k - \delta, \theta_k + \delta]` for an
    invariant rule. The extrema over each :math:`J_k` are taken over ``resolution`` equally
    spaced points including both ends: exact when ``f`` is monotone on each :math:`J_k`
    (monotone ``f``, powers away from 0, ...), a grid approximation otherwise.

    ``values_on`` is a vectorised ``f`` (float64 array in, same shape out).

    Parameters
    ----------
    nodes, weights : array_like
        The Gauss rule :math:`(\theta_k, \tau_k)`, ascending nodes.
    values_on : callable
        Vectorised :math:`f`.
    support : (float, float)
        An interval :math:`[a, b]` containing the support of :math:`\mu`.
    invariant : bool
        The rule is the measure (Lanczos breakdown).
    tol : float
        Absolute node accuracy :math:`\delta`.
    resolution : int
        Grid points per interval for the extrema.

    Returns
    -------
    (float, float)
        Lower and upper bounds on :math:`\int f\,d\mu`.

    Examples
    --------
    >>> quadrature_expectation_bounds([1.0, 3.0], [0.5, 0.5], lambda t: t, (0.0, 4.0))
    (0.5, 3.5)
    """
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    tau = np.asarray(weights, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(theta)
    theta, tau = theta[keep], tau[keep]
    order = np.argsort(theta, kind="stable")
    theta, tau = theta[order], tau[order]
    a, b = float(support[0]), float(support[1])
    if not (np.isfinite(a) and np.isfinite(b) and a <= b):
        raise argument_error("support", "finite (a, b) with a <= b", support)
    if invariant:
        left, right = theta - tol, theta + tol
    else:
        padded = np.concatenate([[a], theta, [b]])
        left, right = padded[:-2] - tol, padded[2:] + tol
    left, right = np.minimum(left, theta), np.maximum(right, theta)
    resolution = check_integer(
        "resolution", resolution, "an integer >= 2 (grid points per interval)", lambda k: k >= 2
    )
    s = np.linspace(0.0, 1.0, resolution)
    points = left[:, None] + (right - left)[:, None] * s[None, :]
    f = values_on
    if not callable(f):
        raise argument_error("f", "a vectorised callable", f, kind=TypeError)
    vals = np.asarray(f(points), dtype=np.float64)
    if vals.shape != points.shape:
        raise argument_error("f", f"a vectorised function returning shape {points.shape}", f)
    if not np.all(np.isfinite(vals)):
        raise argument_error("f", "finite values on the support", f)
    return float(tau @ vals.min(axis=1)), float(tau @ vals.max(axis=1))


def _alpha(confidence: float, points: int, simultaneous: bool) -> float:
    if not (isinstance(confidence, float | int) and 0.0 < float(confidence) < 1.0):
        raise argument_error("confidence", "a number strictly between 0 and 1", confidence)
    alpha = 1.0 - float(confidence)
    return alpha / max(1, points) if simultaneous else alpha


def _kappa_and_probes(kappa: float, num_probes: int) -> tuple[float, int]:
    """Validate the variance factor (finite, >= 0) and the number of probes (>= 1)."""
    kappa = check_real(
        "kappa", kappa, "a finite variance factor >= 0", lambda k: 0.0 <= k < math.inf
    )
    num_probes = check_integer("num_probes", num_probes, "a positive integer", lambda p: p >= 1)
    return kappa, num_probes


def chebyshev_halfwidth(
    oscillation: float, kappa: float, num_probes: int, confidence: float
) -> float:
    r"""Half-width :math:`\sqrt{\kappa\,\omega^2/(4P\alpha)}` of a Chebyshev interval.

    For a probe average of ``P`` quadratic forms with variance at most
    :math:`\kappa\,\omega^2/4` each (``kappa`` from :func:`probe_variance_factor`).

    Parameters
    ----------
    oscillation : float
        Range :math:`\omega` of the quadratic forms' mean function.
    kappa : float
        Variance factor :math:`\kappa`.
    num_probes : int
        Number :math:`P` of probes.
    confidence : float
        Confidence :math:`1 - \alpha`, in (0, 1).

    Returns
    -------
    float
        The half-width.

    Examples
    --------
    >>> round(chebyshev_halfwidth(1.0, 2.0 / 2000, 10, 0.95), 4)
    0.0224
    """
    oscillation = check_real(
        "oscillation", oscillation, "a finite number >= 0", lambda w: 0.0 <= w < math.inf
    )
    kappa, num_probes = _kappa_and_probes(kappa, num_probes)
    alpha = _alpha(confidence, 1, False)
    return float(np.sqrt(kappa / (4.0 * num_probes * alpha)) * oscillation)


def wilson_chebyshev(
    lower_mean: ArrayLike,
    upper_mean: ArrayLike,
    kappa: float,
    num_probes: int,
    confidence: float,
    *,
    simultaneous: bool = False,
) -> tuple[FloatArray, FloatArray]:
    r"""Confidence band for :math:`F` from :math:`\bar L \le \bar F \le \bar U` (see module).

    Solves :math:`(\hat F - F)^2 \le cF(1-F)`, :math:`c = \kappa/(P\alpha)`, for :math:`F`:
    the roots :math:`\big(2\hat F + c \mp \sqrt{c(4\hat F(1-\hat F) + c)}\big)/(2(1+c))`, the
    lower one at :math:`\hat F = \bar L`, the upper at :math:`\hat F = \bar U`. With
    ``simultaneous`` the level is :math:`\alpha/K` for the ``K`` points given (Bonferroni).

    Parameters
    ----------
    lower_mean, upper_mean : array_like
        The certified bounds :math:`\bar L \le \bar U` of the probe average, per point
        (same shape; NaN, an undefined point, gives NaN).
    kappa : float
        Variance factor :math:`\kappa \ge 0` (:func:`probe_variance_factor`).
    num_probes : int
        Number :math:`P \ge 1` of probes.
    confidence : float
        Confidence :math:`1 - \alpha`.
    simultaneous : bool
        Bonferroni over the points given.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Lower and upper ends of the band, clipped to [0, 1].

    Examples
    --------
    >>> lo, hi = wilson_chebyshev([0.5], [0.5], 2.0 / 2000, 10, 0.95)
    >>> round(float(hi[0] - lo[0]), 4)
    0.0447
    """
    kappa, num_probes = _kappa_and_probes(kappa, num_probes)
    lo = np.clip(np.asarray(lower_mean, dtype=np.float64), 0.0, 1.0)
    hi = np.clip(np.asarray(upper_mean, dtype=np.float64), 0.0, 1.0)
    if lo.shape != hi.shape:
        raise argument_error("upper_mean", f"an array of the shape {lo.shape} of lower_mean", hi)
    if np.any(lo > hi):  # NaN (an undefined point) compares False and stays NaN
        worst = int(np.argmax(np.where(lo > hi, lo - hi, -np.inf)))
        raise argument_error(
            "lower_mean",
            "bounds with lower_mean <= upper_mean at every point",
            f"lower_mean {float(lo.flat[worst])!r} > upper_mean {float(hi.flat[worst])!r} "
            f"at index {worst}",
        )
    alpha = _alpha(confidence, int(lo.size), simultaneous)
    c = kappa / (num_probes * alpha)

    def root(f: FloatArray, sign: float) -> FloatArray:
        disc = np.sqrt(np.clip(c * (4.0 * f * (1.0 - f) + c), 0.0, None))
        out: FloatArray = (2.0 * f + c + sign * disc) / (2.0 * (1.0 + c))
        return out

    return np.clip(root(lo, -1.0), 0.0, 1.0), np.clip(root(hi, 1.0), 0.0, 1.0)

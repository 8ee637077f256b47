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
there). These hold for the ``k``-point Gauss rule of any measure, however small the
Lanczos residual at ``k``.

Early stop (near-invariant Krylov space): ``k`` Lanczos steps from
:math:`u = v/\|v\|` give :math:`AQ_k = Q_kT_k + r e_k^\top` with :math:`r \perp Q_k`,
:math:`\|r\| = \beta`; Lanczos stops early when :math:`\beta` is small next to
:math:`\|A\|`. Only :math:`\beta = 0` makes the rule the measure. For :math:`\beta > 0`, let
:math:`G(x) = C_{\#\{\theta_i \le x\}}` and :math:`D(x) = \min_i |x - \theta_i| > 0`. Then

.. math:: |F(x) - G(x)| \;\le\; \bigl(\beta / D(x)\bigr)^2 .

Proof: take the Ritz vectors :math:`y_i = Q_k s_i` with :math:`w_i = s_{1i}` and
:math:`z_i = s_{ki}`, so :math:`u = \sum_i w_i y_i` and
:math:`(A - \theta_i)y_i = z_i r`. Let :math:`\Pi = \mathbf 1[A \le x]`,
:math:`\Pi' = I - \Pi`, :math:`a = \sum_{\theta_i \le x} w_iy_i` and :math:`h = u - a`
(so :math:`\|a\|^2 = G(x)`). For :math:`\theta_i \le x`,
:math:`\Pi'y_i = z_i(A - \theta_i)^{-1}\Pi'r` has norm at most :math:`\beta|z_i|/D`. For
:math:`\theta_i \le x < \theta_j`, :math:`r \perp y_j` gives
:math:`y_i^\top\Pi'y_j = -z_iz_j\,[r^\top(A-\theta_j)^{-1}\Pi r + r^\top(A-\theta_i)^{-1}\Pi' r]
/(\theta_j - \theta_i)`, which is at most :math:`\beta^2|z_iz_j|/(2D^2)` in size. Hence
:math:`1 - F = \|\Pi'u\|^2 \le \|h\|^2 + \|\Pi'a\|^2 + 2|a^\top\Pi'h|
\le 1 - G + (\beta/D)^2 S_L(S_L + S_H)`, where :math:`S_L = \sum_{\theta_i\le x}|w_iz_i|`,
:math:`S_H = \sum_{\theta_i > x}|w_iz_i|` and :math:`S_L + S_H \le \|w\|\|z\| = 1`. The same
argument with :math:`\Pi` bounds :math:`F - G`. The bound is quadratic in
:math:`\beta/D`, but it certifies nothing within a few :math:`\beta` of a node. There a
residual :math:`\beta \ll \|A\|` can hide O(1) mass: eigenvalues
:math:`\{1, 1 + 3\cdot10^{-8}\}` stop after one step with :math:`\beta \approx 1.4\cdot
10^{-8}`, and the second eigenvalue carries 30% of the mass. An early-stopped rule therefore
gets the intersection of this bound with the Chebyshev–Markov–Stieltjes bounds
(``invariant=True`` in :func:`quadrature_cdf_bounds`).

SLQ measures: for a probe ``v`` the measure is
:math:`\mu_v = \sum_j (u_j^\top v)^2/\|v\|^2\,\delta_{\lambda_j}`, whose distribution function
is :math:`F_v(x) = v^\top \mathbf 1[A \le x]\, v/\|v\|^2`; ``m`` Lanczos steps from ``v`` give
its Gauss rule (Ritz values, squared first components of the eigenvectors of :math:`T_m`).

Rounding: the computed rule is taken to be the exact eigen-decomposition of a symmetric
tridiagonal :math:`\tilde T = T + E` with :math:`\|E\|_2 \le \delta` (``tol``, absolute, in the
units of ``x``: the backward error of the Lanczos recurrence and of the tridiagonal
eigensolver, a few :math:`\varepsilon\|A\|`), :math:`T` the exact Jacobi matrix of the measure,
up to eigenvectors orthonormal to a few :math:`m\varepsilon`. By Weyl every node is then within
:math:`\delta` of the exact one, so :func:`quadrature_cdf_bounds` evaluates the bounds at
:math:`x \mp \delta`. The weights are **not** known to relative accuracy: a partial sum
:math:`C_j = e_1^\top P_j e_1` (:math:`P_j` the spectral projector of :math:`T` on its ``j``
smallest eigenvalues) moves with the projector, and the Davis–Kahan :math:`\sin\Theta` theorem
(residual :math:`\|E\tilde X\| \le \delta`, separation
:math:`\hat\theta_{j+1} - \delta - \hat\theta_j` by Weyl) gives

.. math:: |C_j - \hat C_j| \le \|P_j - \tilde P_j\|_2 \le
          w_j = \frac{\delta}{\hat\theta_{j+1} - \hat\theta_j - \delta}

(:func:`split_tolerance`; :math:`w_j = 1` where the two nodes are within :math:`\delta`,
:math:`w_0 = w_m = 0`). Two eigenvalues :math:`3\cdot10^{-8}` apart split their mass only to
about :math:`\varepsilon/(3\cdot10^{-8})`. Since :math:`C` is non-decreasing, the certified
partial sums are :math:`\underline C_j = \max_{i \le j}(\hat C_i - w_i) \le C_j \le
\min_{i \ge j}(\hat C_i + w_i) = \overline C_j`: a cut inside a tight cluster of nodes falls
back to the cuts on either side of the cluster. Finally everything is widened by :math:`\eta`
(``probability_tol``, at least :data:`PROBABILITY_TOL`: non-orthogonality of the computed
eigenvectors and the summation of the weights):
:math:`\ell(x) = \underline C_{\max(k-1,0)} - \eta` with :math:`k = \#\{\hat\theta_i \le x -
\delta\}`, :math:`u(x) = \overline C_{\min(k'+1,m)} + \eta` with :math:`k' = \#\{\hat\theta_i <
x + \delta\}`, clipped to ``[0, 1]``. On a well separated spectrum :math:`w_j` is of the size
of :math:`\delta/\text{gap} \ll \eta`; :func:`quadrature_expectation_bounds` uses the same
certified partial sums in the quantile form below.
For an early-stopped rule, ``tol`` also bounds the dropped residual (:math:`\beta \le \delta`,
see :func:`spectral.slq`). The rounding residual of the computed Lanczos relation is of the
size of the node error :math:`\delta`, so the residual bound is applied with
:math:`\beta_{\text{eff}} = \sqrt2\,\delta` and distance :math:`D(x) - \delta`:
:math:`|F(x) - \hat C_j| \le 2\,(\delta/(D(x) - \delta))^2 + w_j` where :math:`D(x) > \delta`,
:math:`j = \#\{\hat\theta_i \le x\}`.

Quantile form (used for functionals): every measure satisfying the inequalities above with
support in :math:`[a, b]` has quantile function :math:`Q(s) \in [\theta_{k-1}, \theta_{k+1}]`
for :math:`s \in (C_{k-1}, C_k]` (with :math:`\theta_0 = a`, :math:`\theta_{m+1} = b`), hence

.. math:: \sum_k \tau_k \min_{[\theta_{k-1},\theta_{k+1}]} f \;\le\; \int f\,d\mu
          \;\le\; \sum_k \tau_k \max_{[\theta_{k-1},\theta_{k+1}]} f

for every bounded ``f`` (:func:`quadrature_expectation_bounds`).
More generally, if :math:`\ell(x_j) \le F(x_j) \le u(x_j)` at points
:math:`x_1 < \dots < x_p` of :math:`[a, b]`, then :math:`Q(s) \le x_j` when
:math:`\ell(x_j) \ge s` and :math:`Q(s) \ge x_j` when :math:`u(x_j) < s`. The quantile is
therefore confined to an interval that is constant between consecutive values of
:math:`\ell` and :math:`u`. Integrating :math:`\min f` and :math:`\max f` over these
intervals bounds :math:`\int f\,d\mu = \int_0^1 f(Q(s))\,ds`. This is how an early-stopped
rule's cdf bounds become expectation bounds.

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
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from spectral.errors import argument_error, check_integer, check_real

__all__ = [
    "PROBABILITY_TOL",
    "PROBE_VARIANCE",
    "chebyshev_halfwidth",
    "probability_weights",
    "probe_variance_factor",
    "quadrature_cdf_bounds",
    "quadrature_expectation_bounds",
    "split_tolerance",
    "wilson_chebyshev",
]

FloatArray = NDArray[np.float64]

#: Widening in probability of every quadrature bound (rounding in the weights and their sums).
PROBABILITY_TOL = 1e-10

#: Probe distributions for which the concentration bounds hold, and their variance factor
#: ``κ·n`` (``Var F_v ≤ κ F(1 - F)`` with ``κ = 2/n`` or ``2/(n + 2)``).
PROBE_VARIANCE = {"rademacher": 0, "gaussian": 2, "sphere": 2}


#: Weights within this (per entry, relative to 1) of a probability vector are accepted.
WEIGHTS_TOL = 1e-8


def probability_weights(weights: ArrayLike, name: str = "weights") -> FloatArray:
    r"""Check that ``weights`` is a probability vector up to rounding and renormalise it.

    The weights of a computed Gauss rule (squared first components of the eigenvectors
    of the Jacobi matrix) are a probability vector to a few :math:`m\varepsilon`. Weights
    within :data:`WEIGHTS_TOL` per entry of one (8 epsilon of their own dtype for float32 or
    narrower weights, e.g. from a float32 Jacobi matrix) are accepted: rounding negatives are
    clipped to 0 and the vector is divided by its sum, unless that sum is already 1 to
    within the rounding of the summation itself (:math:`2 m \varepsilon`), in which case
    the weights are kept bit for bit (so the map is idempotent: a density saved and
    loaded again has exactly the weights it had). Anything else (a negative weight,
    weights summing to 1.8, NaN or infinite entries) raises naming ``name``: every bound
    of this module assumes a probability measure.

    Parameters
    ----------
    weights : array_like
        The weights (flattened).
    name : str
        The argument's name for the error message.

    Returns
    -------
    numpy.ndarray
        float64 weights, non-negative, summing to 1 to rounding.

    Examples
    --------
    >>> probability_weights([0.25, 0.75]).tolist()
    [0.25, 0.75]
    >>> probability_weights([0.9, 0.9])
    Traceback (most recent call last):
    ...
    ValueError: Argument 'weights': expected weights summing to 1 (they sum to 1.8); ...
    """
    given = np.asarray(weights)
    w = given.astype(np.float64).reshape(-1)
    # weights computed in a narrower dtype (a float32 Jacobi matrix's eigenvectors) are a
    # probability vector only to its rounding: 8 eps per entry, at least WEIGHTS_TOL
    tol = WEIGHTS_TOL
    if np.issubdtype(given.dtype, np.floating):
        tol = max(tol, 8.0 * float(np.finfo(given.dtype).eps))
    if not np.all(np.isfinite(w)):
        raise argument_error(name, "finite weights", weights)
    if w.size and w.min() < -tol:
        raise argument_error(name, "non-negative weights", weights)
    total = float(w.sum())
    if abs(total - 1.0) > tol * max(1, w.size):
        raise argument_error(name, f"weights summing to 1 (they sum to {total!r})", weights)
    clipped = np.clip(w, 0.0, None)
    total = float(clipped.sum())
    if abs(total - 1.0) <= 2.0 * max(1, clipped.size) * np.finfo(np.float64).eps:
        return clipped
    out: FloatArray = clipped / total
    return out


def _gauss_rule(nodes: ArrayLike, weights: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """The rule ``(nodes, weights)`` checked and sorted by node.

    Both 1-D of one length; NaN nodes (the padding of an early-stopped probe) are
    dropped with their weights; at least one node must remain, every node finite, and
    the weights a probability vector (:func:`probability_weights`).
    """
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    given = np.asarray(weights).reshape(-1)  # in its own dtype: its rounding is the tolerance
    if theta.shape != given.shape:
        raise argument_error("weights", f"an array of shape {theta.shape} (one per node)", weights)
    keep = ~np.isnan(theta)
    theta = theta[keep]
    if theta.size == 0:
        raise argument_error("nodes", "at least one node", nodes)
    if not np.all(np.isfinite(theta)):
        raise argument_error("nodes", "finite nodes (NaN entries are dropped as padding)", nodes)
    tau = probability_weights(given[keep], "weights")
    order = np.argsort(theta, kind="stable")
    return theta[order], tau[order]


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
        raise argument_error("kind", f"one of {tuple(PROBE_VARIANCE)} (random probes)", kind)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise argument_error("n", "a positive integer (the operator's dimension)", n)
    return 2.0 / (int(n) + PROBE_VARIANCE[kind])


def split_tolerance(nodes: ArrayLike, tol: float) -> FloatArray:
    r"""Bounds :math:`w_j` on the rounding of the partial sums :math:`\hat C_j` of a Gauss rule.

    Model (module docstring, *Rounding*): the computed rule :math:`(\hat\theta_i, \hat\tau_i)`
    is the eigen-decomposition of a symmetric tridiagonal :math:`\tilde T = T + E`,
    :math:`\|E\|_2 \le \delta` (``tol``), where :math:`T` is the exact Jacobi matrix of the
    measure, up to eigenvectors orthonormal to a few :math:`m\varepsilon` (absorbed by
    :data:`PROBABILITY_TOL`). With :math:`P`, :math:`\tilde P` the spectral projectors of
    :math:`T`, :math:`\tilde T` on their ``j`` smallest eigenvalues,
    :math:`C_j = e_1^\top P e_1` and :math:`\hat C_j = e_1^\top \tilde P e_1`. By Weyl, the
    eigenvalues of :math:`T` outside :math:`P` are :math:`\ge \hat\theta_{j+1} - \delta`, so
    the Davis–Kahan :math:`\sin\Theta` theorem (residual :math:`\|E\tilde X\| \le \delta`)
    gives, for equal-rank projectors,

    .. math:: |C_j - \hat C_j| \le \|P - \tilde P\|_2 = \|\sin\Theta\|_2 \le
              w_j = \frac{\delta}{\hat\theta_{j+1} - \hat\theta_j - \delta}

    where the denominator is positive, and :math:`w_j = 1` (no information) otherwise;
    :math:`w_0 = w_m = 0` (:math:`C_0 = 0`, :math:`C_m = 1`). Close nodes split their mass
    only to :math:`\delta/\text{gap}`: for eigenvalues :math:`1, 1 + 3\cdot 10^{-8}` the
    computed weights are :math:`1/2 \pm 4\cdot 10^{-9}`, not :math:`1/2 \pm 10^{-16}`.

    Parameters
    ----------
    nodes : array_like
        Ascending nodes :math:`\hat\theta_1 \le \dots \le \hat\theta_m` (1-D, finite).
    tol : float
        :math:`\delta \ge 0`, the backward error of the rule (absolute, units of ``nodes``).

    Returns
    -------
    numpy.ndarray
        :math:`(w_0, \dots, w_m)`, float64 in ``[0, 1]``; all zero for ``tol = 0``.

    Examples
    --------
    >>> split_tolerance([0.0, 1.0, 1.0 + 1e-8], 1e-14).round(8).tolist()
    [0.0, 0.0, 1e-06, 0.0]
    """
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    split = np.zeros(theta.size + 1)
    if tol > 0.0 and theta.size > 1:
        gap = np.diff(theta) - tol
        with np.errstate(divide="ignore"):
            split[1:-1] = np.where(gap > 0.0, np.minimum(tol / np.maximum(gap, 0.0), 1.0), 1.0)
    return split


def _certified_partial_sums(
    cumulative: FloatArray, split: FloatArray
) -> tuple[FloatArray, FloatArray]:
    r"""``(floor, ceiling)``: the certified partial sums of a Gauss rule.

    With :math:`|C_j - \hat C_j| \le w_j` (``cumulative``, ``split``:
    :func:`split_tolerance`) and :math:`C` non-decreasing,
    :math:`\max_{i \le j}(\hat C_i - w_i) \le C_j \le \min_{i \ge j}(\hat C_i + w_i)`.

    >>> f, c = _certified_partial_sums(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.1, 0.0]))
    >>> f.tolist(), c.tolist()
    ([0.0, 0.4, 1.0], [0.0, 0.6, 1.0])
    """
    floor = np.maximum.accumulate(cumulative - split)
    ceiling = np.minimum.accumulate((cumulative + split)[::-1])[::-1]
    return floor, ceiling


def quadrature_cdf_bounds(
    nodes: ArrayLike,
    weights: ArrayLike,
    x: ArrayLike,
    *,
    invariant: bool = False,
    tol: float = 0.0,
    probability_tol: float = PROBABILITY_TOL,
    split_tol: float | None = None,
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
        The rule comes from a Lanczos run that stopped early, with a dropped residual
        :math:`\beta \le \delta` (``tol``). The Chebyshev–Markov–Stieltjes bounds are then
        intersected with :math:`G(x) \mp 2(\delta/(D(x) - \delta))^2` wherever
        :math:`D(x) = \min_i|x - \theta_i| > \delta` (see the module docstring). With
        ``tol=0`` (:math:`\beta = 0`, an exactly invariant space) the rule is the measure:
        :math:`F(x) = C_{\#\{\theta_i \le x\}}`.
    tol:
        :math:`\delta \ge 0`, the absolute accuracy of the nodes (see the module docstring),
        and for ``invariant=True`` a bound on the dropped residual.
    probability_tol:
        :math:`\eta \ge 0`, the accuracy of the partial sums of the weights.
    split_tol:
        The backward error :math:`\|E\|` of the rule that :func:`split_tolerance` uses
        for how the mass splits between close nodes; default ``tol``. Only a caller that
        knows the rounding part of ``tol`` apart from a dropped residual (which perturbs
        the nodes but not the rule's weights) may pass less.

    Returns
    -------
    lower, upper:
        float64 arrays of the shape of ``x`` with
        :math:`L(x-\delta) - \eta \le F(x) \le U(x+\delta) + \eta`, clipped to ``[0, 1]``,
        where the partial sums in :math:`L` and :math:`U` are the certified ones
        :math:`\underline C_j`, :math:`\overline C_j` (``tol`` also bounds how the mass
        splits between close nodes, :func:`split_tolerance`); NaN where ``x`` is NaN.

    Examples
    --------
    >>> lo, hi = quadrature_cdf_bounds([1.0, 2.0], [0.5, 0.5], [1.5], invariant=True)
    >>> lo.round(6).tolist(), hi.round(6).tolist()
    ([0.5], [0.5])
    """
    theta, tau = _gauss_rule(nodes, weights)
    if not (np.isfinite(tol) and tol >= 0):
        raise argument_error("tol", "a non-negative number", tol)
    m = theta.size
    cumulative = np.concatenate([[0.0], np.cumsum(tau)])
    cumulative[-1] = 1.0
    split_tol = tol if split_tol is None else split_tol
    if not (np.isfinite(split_tol) and split_tol >= 0):
        raise argument_error("split_tol", "None or a non-negative number", split_tol)
    split = split_tolerance(theta, split_tol)  # |C_j - Ĉ_j| <= w_j (Davis–Kahan)
    floor, ceiling = _certified_partial_sums(cumulative, split)
    xs = np.asarray(x, dtype=np.float64)
    below = np.searchsorted(theta, xs - tol, side="right")  # #{θ_i <= x - δ}
    if invariant and tol == 0.0:  # β = 0: the rule is the measure
        lower = cumulative[below]
        upper = cumulative[np.searchsorted(theta, xs + tol, side="right")]
    else:
        lower = floor[np.maximum(below - 1, 0)]
        strictly = np.searchsorted(theta, xs + tol, side="left")  # #{θ_i < x + δ}
        upper = ceiling[np.minimum(strictly + 1, m)]
        if invariant:
            lower, upper = _residual_bounds(theta, cumulative, split, xs, tol, (lower, upper))
    if not (np.isfinite(probability_tol) and probability_tol >= 0):
        raise argument_error("probability_tol", "a non-negative number", probability_tol)
    undefined = np.isnan(xs)  # searchsorted puts NaN past every node: F(NaN) = 1 otherwise
    lo: FloatArray = np.where(undefined, np.nan, np.clip(lower - probability_tol, 0.0, 1.0))
    hi: FloatArray = np.where(undefined, np.nan, np.clip(upper + probability_tol, 0.0, 1.0))
    return lo, hi


def _residual_bounds(
    theta: FloatArray,
    cumulative: FloatArray,
    split: FloatArray,
    xs: FloatArray,
    tol: float,
    bounds: tuple[FloatArray, FloatArray],
) -> tuple[FloatArray, FloatArray]:
    r"""Intersect ``bounds`` with :math:`\hat C_j \mp (2(\delta/(D(x) - \delta))^2 + w_j)`.

    This is the early-stop bound of the module docstring with
    :math:`\beta_{\text{eff}} = \sqrt2\,\delta`, applied where :math:`D(x) > \delta`;
    :math:`j = \#\{\theta_i \le x\}` and :math:`w_j` (``split``, :func:`split_tolerance`)
    bounds the rounding of the computed partial sum :math:`\hat C_j` (``cumulative``).
    ``theta`` is sorted.
    """
    lower, upper = bounds
    count = np.searchsorted(theta, xs, side="right")  # #{θ_i <= x}
    left = theta[np.clip(count - 1, 0, theta.size - 1)]
    right = theta[np.clip(count, 0, theta.size - 1)]
    with np.errstate(invalid="ignore"):  # NaN and infinite x
        distance = np.minimum(np.abs(xs - left), np.abs(right - xs))
        margin = distance - tol
        usable = margin > 0.0
        slack = np.where(usable, 2.0 * np.square(tol / np.where(usable, margin, 1.0)), 1.0)
    slack = slack + split[count]
    centre = cumulative[count]
    return np.maximum(lower, centre - slack), np.minimum(upper, centre + slack)


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
    :math:`\theta_{m+1} = b`). For an early-stopped rule (``invariant=True``, dropped residual
    :math:`\beta \le \delta`), these bounds are intersected with the quantile bounds of
    :func:`quadrature_cdf_bounds` (``invariant=True``). Those are evaluated at the nodes, at
    their midpoints and at :math:`\theta_k \pm \delta(1 + 10^{j/2})`, ``j = 0..16``
    (module docstring, quantile form). With ``tol > 0`` the partial sums of the weights are
    only known to :math:`\hat C_j \mp w_j` (:func:`split_tolerance`); a level
    :math:`s` within :math:`w_j` of :math:`\hat C_j` may then belong to either neighbouring
    node, and its :math:`J` is the union of theirs. With ``tol=0`` the rule is the measure:
    :math:`\int f\,d\mu = \sum_k \tau_k f(\theta_k)`. The extrema of ``f`` over each interval
    are taken over ``resolution`` equally spaced points including both ends. They are exact
    when ``f`` is monotone on each interval (monotone ``f``, powers away from 0, ...) and a
    grid approximation otherwise.

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
        The rule comes from a Lanczos run stopped early with residual at most ``tol``.
    tol : float
        Absolute node accuracy :math:`\delta` (and the residual bound for ``invariant``).
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
    theta, tau = _gauss_rule(nodes, weights)
    a, b = float(support[0]), float(support[1])
    if not (np.isfinite(a) and np.isfinite(b) and a <= b):
        raise argument_error("support", "finite (a, b) with a <= b", support)
    if not (np.isfinite(tol) and tol >= 0):
        raise argument_error("tol", "a non-negative number", tol)
    if theta[0] < a - tol or theta[-1] > b + tol:  # Gauss nodes lie in the support's hull
        raise argument_error(
            "support",
            f"an interval containing every node up to tol = {tol:.3g} (nodes "
            f"[{theta[0]!r}, {theta[-1]!r}])",
            support,
        )
    resolution = check_integer(
        "resolution", resolution, "an integer >= 2 (grid points per interval)", lambda k: k >= 2
    )
    if not callable(values_on):
        raise argument_error("values_on", "a vectorised callable", values_on, kind=TypeError)
    if invariant and tol == 0.0:  # β = 0: the rule is the measure
        mass, left, right = tau, theta, theta
    else:
        mass, left, right = _gauss_quantile_intervals(theta, tau, tol, a, b)
    low, high = _extrema(values_on, left, right, resolution)
    lower, upper = float(mass @ low), float(mass @ high)
    if invariant and tol > 0.0:
        mass, q_left, q_right = _quantile_intervals(theta, tau, tol, a, b)
        low, high = _extrema(values_on, q_left, q_right, resolution)
        lower, upper = max(lower, float(mass @ low)), min(upper, float(mass @ high))
    return lower, upper


def _extrema(
    f: Callable[..., Any], left: FloatArray, right: FloatArray, resolution: int
) -> tuple[FloatArray, FloatArray]:
    """Minima and maxima of ``f`` over ``resolution`` points of each ``[left_i, right_i]``."""
    s = np.linspace(0.0, 1.0, resolution)
    points = left[:, None] + (right - left)[:, None] * s[None, :]
    vals = np.asarray(f(points), dtype=np.float64)
    if vals.shape != points.shape:
        raise argument_error("f", f"a vectorised function returning shape {points.shape}", f)
    if not np.all(np.isfinite(vals)):
        raise argument_error("f", "finite values on the support", f)
    return vals.min(axis=1), vals.max(axis=1)


def _gauss_quantile_intervals(
    theta: FloatArray, tau: FloatArray, tol: float, a: float, b: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    r"""``(mass, left, right)``: the quantile form of the Chebyshev–Markov–Stieltjes bounds.

    :math:`Q(s) \in [\theta_{k-1} - \delta, \theta_{k+1} + \delta]` for
    :math:`s \in (C_{k-1}, C_k]`, with the partial sums :math:`C_j` known only to
    :math:`\hat C_j \mp w_j` (:func:`split_tolerance`): a level ``s`` may belong to every
    ``k`` with :math:`\underline C_{k-1} < s \le \overline C_k` (the certified floors and
    ceilings), so ``Q(s)`` lies in the union of their intervals. The levels with the same
    union form one entry of ``mass``; ``theta`` is sorted, :math:`\theta_0 = a`,
    :math:`\theta_{m+1} = b`.
    """
    cumulative = np.concatenate([[0.0], np.cumsum(tau)])
    cumulative[-1] = 1.0
    floor, ceiling = _certified_partial_sums(cumulative, split_tolerance(theta, tol))
    levels = np.unique(np.clip(np.concatenate([floor, ceiling]), 0.0, 1.0))
    middle = (levels[:-1] + levels[1:]) / 2.0
    first = np.searchsorted(ceiling, middle, side="left")  # smallest possible k
    last = np.searchsorted(floor, middle, side="left")  # largest possible k
    padded = np.concatenate([[a], theta, [b]])
    left = np.minimum(padded[first - 1] - tol, theta[first - 1])  # 1 <= first <= last <= m
    right = np.maximum(padded[last + 1] + tol, theta[last - 1])
    return np.diff(levels), left, right


def _quantile_intervals(
    theta: FloatArray, tau: FloatArray, tol: float, a: float, b: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    r"""``(mass, left, right)``: the quantile :math:`Q(s)` lies in ``[left_i, right_i]`` on
    a set of levels ``s`` of measure ``mass_i`` (the ``mass_i`` sum to 1).

    The confinement follows from the early-stop cdf bounds at the points described in
    :func:`quadrature_expectation_bounds`. The support ``[a, b]`` gives :math:`F = 0`
    below ``a`` and :math:`F(b) = 1`.
    """
    offsets = tol * (1.0 + 10.0 ** (np.arange(17) / 2.0))
    points = np.concatenate(
        [theta, (theta[:-1] + theta[1:]) / 2.0, (theta[:, None] + offsets).ravel()]
    )
    points = np.concatenate([points, (theta[:, None] - offsets).ravel()])
    points = np.unique(np.clip(points, a, b))
    low, high = quadrature_cdf_bounds(
        theta, tau, points, invariant=True, tol=tol, probability_tol=0.0
    )
    low = np.maximum.accumulate(low)  # F is non-decreasing
    high = np.minimum.accumulate(high[::-1])[::-1]
    levels = np.unique(np.clip(np.concatenate([[0.0, 1.0], low, high]), 0.0, 1.0))
    middle = (levels[:-1] + levels[1:]) / 2.0
    above = np.searchsorted(low, middle, side="left")  # first x_j with ℓ(x_j) >= s
    below = np.searchsorted(high, middle, side="left") - 1  # last x_j with u(x_j) < s
    right = np.where(above < points.size, points[np.minimum(above, points.size - 1)], b)
    left = np.where(below >= 0, points[np.maximum(below, 0)], a)
    return np.diff(levels), left, right


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
    The lower root is evaluated without cancellation and rounded down, the upper one as
    :math:`1 -` (lower root at :math:`1 - \bar U`) and so rounded up: the band never loses
    a value to rounding, and :math:`\bar L = 0` gives exactly 0, :math:`\bar U = 1` exactly 1.

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
    lower = _lower_root(lo, c)
    # F -> 1 - F maps the inequality to itself; one ulp up covers the rounding of 1 - r.
    upper = np.nextafter(1.0 - _lower_root(1.0 - hi, c), np.inf)
    return np.clip(lower, 0.0, 1.0), np.clip(upper, 0.0, 1.0)


def _lower_root(f: FloatArray, c: float) -> FloatArray:
    r"""The smaller root of :math:`(f - F)^2 = cF(1 - F)`, rounded down; exactly 0 at ``f = 0``.

    The root :math:`(2f + c - \sqrt{c(4f(1-f) + c)})/(2(1+c))` is evaluated in the
    cancellation-free form :math:`2f^2/(2f + c + \sqrt{c(4f(1-f) + c)})` (rationalised;
    :math:`f` itself when :math:`c = 0`). Every operation there adds positive terms, so the
    relative error is at most about :math:`10\varepsilon`; the result is multiplied by
    :math:`1 - 64\varepsilon` so that it never exceeds the exact root. This also covers the
    rounding of :math:`1 - \bar U` (exact for :math:`\bar U \ge 1/2`, else off by at most
    :math:`\varepsilon/4` in :math:`f \ge 1/2`, where the root's relative slope
    :math:`r'/r \le 2/f \le 4`). Upper ends are formed as ``1 - _lower_root(1 - f)`` moved
    one ulp up (the subtraction rounds) and clipped to 1, hence rounded up and exactly 1 at
    ``f = 1``.

    >>> _lower_root(np.array([0.0, 0.5, 1.0]), 0.0).tolist()
    [0.0, 0.5, 1.0]
    """
    disc = np.sqrt(c * (4.0 * f * (1.0 - f) + c))
    denominator = 2.0 * f + c + disc
    with np.errstate(invalid="ignore", divide="ignore"):  # f = c = 0: 0/0, the root is 0
        root = np.where(f == 0.0, 0.0, 2.0 * f * f / denominator)  # NaN stays NaN
    out: FloatArray = root * (1.0 - 64.0 * np.finfo(np.float64).eps)
    return out

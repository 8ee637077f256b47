r"""Discrete spectral densities: the moment-matched output of stochastic Lanczos quadrature.

A :class:`SpectralDensity` is a discrete probability measure on the real line,

.. math:: \hat\mu = \sum_{i=1}^{N} w_i\,\delta_{\theta_i},\qquad w_i \ge 0,\quad \sum_i w_i = 1,

approximating the empirical spectral measure :math:`\mu = \frac1n\sum_j \delta_{\lambda_j}` of a
symmetric :math:`n \times n` operator. From ``P`` Lanczos probes of ``m`` steps each, the pooled
measure puts weight :math:`\gamma^{(k)}_i / P` on the Ritz value :math:`\theta^{(k)}_i` of probe
:math:`k`; the per-probe nodes and weights are kept (``probe_nodes``, ``probe_weights``, NaN-padded
when a probe stopped early) so that the spread between probes can be reported.

Gauss quadrature makes each probe's measure match the moments of order :math:`\le 2m - 1` of
the probe's spectral measure :math:`\sum_j (v^\top u_j)^2 \delta_{\lambda_j}/\|v\|^2` exactly, hence
:math:`\mathrm{tr}\,f(A) \approx n \sum_i w_i f(\theta_i)` (:meth:`SpectralDensity.expectation`,
:meth:`SpectralDensity.trace`).

>>> d = SpectralDensity([1.0, 3.0], [0.25, 0.75])
>>> d.moment(1), d.trace(4)
(2.5, 10.0)
>>> d.cdf([0.0, 1.0, 2.0, 3.0]).tolist()
[0.0, 0.25, 0.25, 1.0]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.special
import scipy.stats
from numpy.typing import ArrayLike, NDArray

from spectral import bounds
from spectral.errors import argument_error, check_integer, check_real
from spectral.io import CorruptFileError, load_npz, save_npz

__all__ = ["KERNELS", "SOURCES", "SpectralDensity"]

FloatArray = NDArray[np.float64]
KERNELS = ("gaussian", "lorentzian")
_FORMAT = "spectral.SpectralDensity/1"
#: What a density was built from: Gauss quadrature (SLQ) or exact eigenvalues.
SOURCES = ("quadrature", "eigenvalues")
# Node accuracy (relative to max |θ|, per Lanczos step) assumed when none is given.
_NODE_RTOL = 8.0 * float(np.finfo(np.float64).eps)


def _readonly(a: FloatArray) -> FloatArray:
    a.setflags(write=False)
    return a


def _out(a: FloatArray) -> Any:
    """A float for a 0-d array, else the array."""
    return float(a) if a.ndim == 0 else a


def _evaluate(f: Callable[[FloatArray], ArrayLike], points: FloatArray) -> FloatArray:
    """``f`` on a copy of ``points`` as a float64 array of their shape, or a named error."""
    if not callable(f):
        raise argument_error("f", "a vectorised callable", f, kind=TypeError)
    result = f(points.copy())
    try:
        values = np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # a string, a list of arrays...
        raise argument_error(
            "f", f"a vectorised function returning real values of shape {points.shape}", f
        ) from exc
    if values.shape != points.shape:
        name = getattr(f, "__name__", type(f).__name__)
        raise argument_error(
            "f",
            f"a vectorised function returning shape {points.shape} (one value per node)",
            f"{name} returning shape {values.shape}",
        )
    return values


def kernel_width(sigma: Any) -> float:
    r"""The kernel width of :meth:`SpectralDensity.smooth`: a positive finite number, at
    least the smallest normal float64 (2.2e-308), so that the kernel's peak
    :math:`1/(\sigma\sqrt{2\pi})` (Lorentzian: :math:`1/(\pi\sigma)`) is a finite float.

    >>> kernel_width(0.5)
    0.5
    """
    tiny = float(np.finfo(np.float64).tiny)
    return check_real(
        "sigma",
        sigma,
        f"a positive finite number >= {tiny:.4g} (the smallest normal float64)",
        lambda s: tiny <= s < math.inf,
    )


def _real_values(name: str, given: Any) -> FloatArray:
    """``given`` as a flat float64 array of finite reals (at least one), else an error naming
    ``name``: ``TypeError`` for complex or non-numeric input, ``ValueError`` for an empty
    array or NaN/Inf.

    >>> _real_values("other", [[1, 2]]).tolist()
    [1.0, 2.0]
    """
    expected = "a SpectralDensity or a non-empty array of finite reals"
    try:
        raw = np.asarray(given)
    except (TypeError, ValueError) as exc:  # ragged nested sequences
        raise argument_error(name, expected, given, kind=TypeError) from exc
    if raw.dtype.kind not in "fiub":  # complex (imaginary parts would be dropped), text, None
        raise argument_error(name, expected, given, kind=TypeError)
    values = raw.astype(np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise argument_error(name, expected, given)
    return values


def _readonly_bool(a: NDArray[np.bool_]) -> NDArray[np.bool_]:
    a.setflags(write=False)
    return a


class SpectralDensity:
    r"""A discrete probability measure :math:`\sum_i w_i \delta_{\theta_i}` on :math:`\mathbb{R}`.

    Parameters
    ----------
    nodes, weights:
        1-D arrays of the same length ``N``: the support points :math:`\theta_i` (finite)
        and their masses :math:`w_i \ge 0` summing to 1 (up to :math:`10^{-8} N`; they are
        renormalised exactly). Nodes are sorted ascending on construction.
    probe_nodes, probe_weights:
        Optional ``(P, m)`` arrays: the measure of each of ``P`` probes, NaN-padded on the
        right where a probe produced fewer than ``m`` nodes. Each row's weights sum to 1.
        They are kept for the spread between probes; they are not re-pooled.
    source:
        ``"quadrature"`` when each probe's row is the Gauss quadrature rule of that probe's
        spectral measure (what :func:`spectral.slq` builds; without per-probe data the
        pooled measure is read as one rule), ``"eigenvalues"`` for an exact empirical
        spectral measure, ``None`` (unknown: no bounds are offered).
    dimension:
        ``n``, the size of the operator (needed by :meth:`cdf_band`).
    probe_kind:
        How the probes were drawn: ``"rademacher"``, ``"gaussian"``, ``"sphere"`` or
        ``"explicit"`` (given by the caller; no concentration bound is assumed).
    probe_invariant:
        ``(P,)`` booleans: the probe stopped early (Lanczos residual :math:`\beta \le
        \delta_k`, an invariant Krylov space to working precision); see :meth:`cdf_bounds`.
    probe_tolerance:
        ``(P,)`` absolute accuracies :math:`\delta_k` of each probe's nodes (default
        :math:`8 m \varepsilon \max|\theta|` with the float64 :math:`\varepsilon`).

    Raises
    ------
    ValueError
        Shapes disagree, non-finite nodes, negative weights or weights not summing to 1.

    The object is immutable (its arrays are read-only).

    Examples
    --------
    >>> d = SpectralDensity([2.0, -1.0], [0.5, 0.5])
    >>> d.nodes.tolist(), d.negative_mass()
    ([-1.0, 2.0], 0.5)
    """

    __slots__ = (
        "dimension",
        "nodes",
        "probe_invariant",
        "probe_kind",
        "probe_nodes",
        "probe_tolerance",
        "probe_weights",
        "source",
        "weights",
    )

    nodes: FloatArray
    weights: FloatArray
    probe_nodes: FloatArray | None
    probe_weights: FloatArray | None
    source: str | None
    dimension: int | None
    probe_kind: str | None
    probe_invariant: NDArray[np.bool_] | None
    probe_tolerance: FloatArray | None

    def __init__(
        self,
        nodes: ArrayLike,
        weights: ArrayLike,
        probe_nodes: ArrayLike | None = None,
        probe_weights: ArrayLike | None = None,
        *,
        source: str | None = None,
        dimension: int | None = None,
        probe_kind: str | None = None,
        probe_invariant: ArrayLike | None = None,
        probe_tolerance: ArrayLike | None = None,
    ) -> None:
        for name, given in (("nodes", nodes), ("weights", weights)):
            if np.iscomplexobj(given):
                raise argument_error(name, "real values", given, kind=TypeError)
        theta = np.array(nodes, dtype=np.float64, copy=True)
        w = np.array(weights, dtype=np.float64, copy=True)
        if theta.ndim != 1 or theta.size == 0:
            raise argument_error("nodes", "a non-empty 1-D array", nodes)
        if w.shape != theta.shape:
            raise argument_error("weights", f"a 1-D array of shape {theta.shape}", weights)
        if not np.all(np.isfinite(theta)):
            raise argument_error("nodes", "finite values", nodes)
        if not np.all(np.isfinite(w)):
            raise argument_error("weights", "finite values", weights)
        w = bounds.probability_weights(w, "weights")
        order = np.argsort(theta, kind="stable")
        self.nodes = _readonly(theta[order])
        self.weights = _readonly(w[order])
        if (probe_nodes is None) != (probe_weights is None):
            raise argument_error("probe_weights", "given together with probe_nodes", probe_weights)
        self.probe_nodes = None
        self.probe_weights = None
        if probe_nodes is not None and probe_weights is not None:
            pn = np.array(probe_nodes, dtype=np.float64, copy=True)
            pw = np.array(probe_weights, dtype=np.float64, copy=True)
            if pn.ndim != 2 or pn.shape != pw.shape or pn.shape[0] == 0:
                raise argument_error("probe_nodes", "two (num_probes, m) arrays of equal shape", pn)
            if not np.array_equal(np.isnan(pn), np.isnan(pw)):
                raise argument_error("probe_weights", "NaN exactly where probe_nodes is NaN", pw)
            for k in range(pn.shape[0]):
                row = pw[k][~np.isnan(pw[k])]
                if row.size == 0:
                    raise argument_error("probe_weights", f"a non-empty row {k}", pw)
                pw[k, ~np.isnan(pw[k])] = bounds.probability_weights(row, f"probe_weights[{k}]")
            self.probe_nodes = _readonly(pn)
            self.probe_weights = _readonly(pw)
        self._set_provenance(source, dimension, probe_kind, probe_invariant, probe_tolerance)

    def _set_provenance(
        self,
        source: str | None,
        dimension: int | None,
        probe_kind: str | None,
        probe_invariant: ArrayLike | None,
        probe_tolerance: ArrayLike | None,
    ) -> None:
        """Validate and store what the measure was built from (see the class docstring)."""
        if source is not None and source not in SOURCES:
            raise argument_error("source", f"None or one of {SOURCES}", source)
        self.source = source
        if dimension is not None:
            if isinstance(dimension, bool) or not isinstance(dimension, int | np.integer):
                raise argument_error("dimension", "None or a positive integer", dimension)
            if dimension < 1:
                raise argument_error("dimension", "None or a positive integer", dimension)
            dimension = int(dimension)
        self.dimension = dimension
        if probe_kind is not None and not isinstance(probe_kind, str):
            raise argument_error("probe_kind", "None or a string", probe_kind, kind=TypeError)
        self.probe_kind = probe_kind
        rows, counts = self._rules()
        p = len(rows)
        inv = np.zeros(p, dtype=bool)
        if probe_invariant is not None:
            inv = np.array(probe_invariant, dtype=bool).reshape(-1)
            if inv.shape != (p,):
                raise argument_error("probe_invariant", f"{p} booleans (one per probe)", inv)
        tol = np.array(
            [_NODE_RTOL * c * float(np.max(np.abs(t))) for (t, _), c in zip(rows, counts)]
        )
        if probe_tolerance is not None:
            given = np.array(probe_tolerance, dtype=np.float64).reshape(-1)
            if given.shape != (p,) or not np.all(np.isfinite(given)) or np.any(given < 0):
                raise argument_error(
                    "probe_tolerance", f"{p} non-negative numbers (one per probe)", given
                )
            tol = given
        self.probe_invariant = _readonly_bool(inv) if source == "quadrature" else None
        self.probe_tolerance = _readonly(tol) if source == "quadrature" else None

    def _rules(self) -> tuple[list[tuple[FloatArray, FloatArray]], list[int]]:
        """Each probe's (nodes, weights) without padding, and its number of nodes."""
        if self.probe_nodes is None or self.probe_weights is None:
            return [(self.nodes, self.weights)], [int(self.nodes.size)]
        rows = []
        for k in range(self.probe_nodes.shape[0]):
            keep = ~np.isnan(self.probe_nodes[k])
            rows.append((self.probe_nodes[k][keep], self.probe_weights[k][keep]))
        return rows, [int(t.size) for t, _ in rows]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_probes(
        cls,
        probe_nodes: ArrayLike,
        probe_weights: ArrayLike,
        **provenance: Any,
    ) -> SpectralDensity:
        r"""Pool ``P`` per-probe measures (rows, NaN-padded) into :math:`\frac1P\sum_k \hat\mu_k`.

        Keyword arguments (``source``, ``dimension``, ``probe_kind``, ``probe_invariant``,
        ``probe_tolerance``) are passed to the constructor.

        >>> nodes = [[0.0, 2.0], [1.0, np.nan]]
        >>> d = SpectralDensity.from_probes(nodes, [[0.5, 0.5], [1.0, np.nan]])
        >>> d.nodes.tolist(), d.weights.tolist(), d.num_probes
        ([0.0, 1.0, 2.0], [0.25, 0.5, 0.25], 2)
        """
        pn = np.atleast_2d(np.asarray(probe_nodes, dtype=np.float64))
        pw = np.atleast_2d(np.asarray(probe_weights, dtype=np.float64))
        if pn.shape != pw.shape:
            raise argument_error("probe_weights", f"an array of shape {pn.shape}", pw)
        keep = ~np.isnan(pn)
        num_probes = pn.shape[0]
        nodes = pn[keep]
        weights = pw[keep] / num_probes
        return cls(nodes, weights, probe_nodes=pn, probe_weights=pw, **provenance)

    @classmethod
    def from_eigenvalues(cls, eigenvalues: ArrayLike) -> SpectralDensity:
        r"""The empirical spectral measure :math:`\frac1n\sum_j \delta_{\lambda_j}`.

        >>> SpectralDensity.from_eigenvalues([1.0, 2.0, 3.0, 4.0]).moment(1)
        2.5
        """
        lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
        if lam.size == 0:
            raise argument_error("eigenvalues", "a non-empty array", eigenvalues)
        return cls(lam, np.full(lam.size, 1.0 / lam.size), source="eigenvalues", dimension=lam.size)

    # ------------------------------------------------------------------ properties
    @property
    def num_probes(self) -> int:
        """Number of probes behind the measure (1 when no per-probe data are kept)."""
        return 1 if self.probe_nodes is None else int(self.probe_nodes.shape[0])

    def __len__(self) -> int:
        return int(self.nodes.size)

    def __repr__(self) -> str:
        lo, hi = float(self.nodes[0]), float(self.nodes[-1])
        return (
            f"SpectralDensity({len(self)} nodes in [{lo:.6g}, {hi:.6g}], "
            f"num_probes={self.num_probes})"
        )

    # ------------------------------------------------------------------ functionals
    def expectation(self, f: Callable[[FloatArray], ArrayLike]) -> float:
        r"""Return :math:`\sum_i w_i f(\theta_i)` for a vectorised ``f`` on float64 arrays.

        >>> SpectralDensity([1.0, 4.0], [0.5, 0.5]).expectation(np.sqrt)
        1.5
        """
        return float(np.dot(self.weights, _evaluate(f, self.nodes)))

    def probe_expectations(self, f: Callable[[FloatArray], ArrayLike]) -> FloatArray:
        r"""Return :math:`\sum_i w^{(k)}_i f(\theta^{(k)}_i)` per probe :math:`k`, shape ``(P,)``.

        Without per-probe data this is the pooled value, as a length-1 array.

        >>> d = SpectralDensity.from_probes([[1.0], [3.0]], [[1.0], [1.0]])
        >>> d.probe_expectations(lambda x: x).tolist()
        [1.0, 3.0]
        """
        if self.probe_nodes is None or self.probe_weights is None:
            return np.array([self.expectation(f)])
        out = np.empty(self.probe_nodes.shape[0])
        for k in range(out.size):
            keep = ~np.isnan(self.probe_nodes[k])
            values = _evaluate(f, self.probe_nodes[k][keep])
            out[k] = float(np.dot(self.probe_weights[k][keep], values))
        return out

    def moment(self, p: int) -> float:
        r"""Return the raw moment :math:`\sum_i w_i \theta_i^p` for an integer ``p >= 0``.

        >>> SpectralDensity([-1.0, 1.0], [0.5, 0.5]).moment(2)
        1.0
        """
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0:
            raise argument_error("p", "a non-negative integer", p)
        return float(np.dot(self.weights, self.nodes ** int(p)))

    def trace(self, n: int) -> float:
        r"""Return the trace estimate :math:`n \sum_i w_i \theta_i` of an ``n × n`` operator.

        >>> SpectralDensity([1.0, 3.0], [0.5, 0.5]).trace(10)
        20.0
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise argument_error("n", "a positive integer (the operator's dimension)", n)
        return float(n) * self.moment(1)

    def cdf(self, x: ArrayLike) -> Any:
        r"""Return :math:`F(x) = \sum_{\theta_i \le x} w_i`, right-continuous and non-decreasing.

        Scalars give a float, arrays an array of the same shape; NaN gives NaN.

        >>> SpectralDensity([0.0, 1.0], [0.5, 0.5]).cdf(0.0)
        0.5
        """
        xs = np.asarray(x, dtype=np.float64)
        cumulative = np.concatenate([[0.0], np.minimum(np.cumsum(self.weights), 1.0)])
        idx = np.searchsorted(self.nodes, xs, side="right")
        out = cumulative[idx]
        # The total mass is exactly one beyond the last node; NaN stays NaN (as in a ufunc).
        out = np.where(xs >= self.nodes[-1], 1.0, out)
        out = np.where(np.isnan(xs), np.nan, out)
        if out.ndim == 0:
            return float(out)
        return out

    # ------------------------------------------------------------------ certified bounds
    def _require_bounds(self, what: str) -> None:
        if self.source is None:
            raise ValueError(
                f"{what}: this density was not built by Gauss quadrature (spectral.slq) nor "
                "from exact eigenvalues (source=None), so no bound holds for it; build it "
                "with slq(...) or pass source='quadrature' for rows that are Gauss rules."
            )

    def cdf_bounds(self, x: ArrayLike, probe: int | None = None) -> tuple[Any, Any]:
        r"""Certified bounds :math:`\ell(x) \le F_k(x) \le u(x)` on a probe's distribution function.

        For probe ``k`` with Gauss rule :math:`(\theta_i, \tau_i)` (ascending nodes, partial
        sums :math:`C_j = \sum_{i \le j}\tau_i`) of its spectral measure
        :math:`\mu_k = \sum_j (u_j^\top v_k)^2/\|v_k\|^2\,\delta_{\lambda_j}`, the
        Chebyshev–Markov–Stieltjes inequalities give, for **every** real ``x``,

        .. math:: C_{\max(\#\{\theta_i \le x\} - 1,\,0)} \;\le\; F_k(x) = \mu_k((-\infty, x])
                  \;\le\; C_{\min(\#\{\theta_i < x\} + 1,\,m)}

        (the mass strictly left of the node at or below ``x``; the mass up to the next node
        at or above ``x``). These hold for any Gauss rule, also after an early stop. After an
        early stop (:attr:`probe_invariant`: the Lanczos residual :math:`\beta \le \delta_k`
        was dropped) they are intersected with
        :math:`C_{\#\{\theta_i \le x\}} \mp 2(\delta_k/(D(x) - \delta_k))^2`, where
        :math:`D(x) = \min_i|x - \theta_i| > \delta_k`. This gives
        :math:`|F_k - C_{\#\{\theta_i\le x\}}| \le (\beta/D)^2` for an early-stopped rule,
        with rounding included (:mod:`spectral.bounds`). Away from the nodes the bounds
        therefore coincide. Near a node a small residual can hide mass at an eigenvalue the
        run never resolved, so there they are the Chebyshev–Markov–Stieltjes bounds. To
        absorb rounding,
        the bounds are evaluated at :math:`x \mp \delta_k` (:attr:`probe_tolerance`), each
        partial sum :math:`C_j` is taken as known only to
        :math:`\pm\delta_k/(\theta_{j+1} - \theta_j - \delta_k)` (by Davis–Kahan, the mass of
        two close nodes splits only to :math:`\delta/\text{gap}`; a cut inside a cluster
        of nodes falls back to the cuts around the cluster,
        :func:`spectral.bounds.split_tolerance`), and everything is widened in probability by
        :math:`\eta_k = \max(10^{-10}, \delta_k/\max_i|\theta_i|)`; see :mod:`spectral.bounds`.
        In float64 :math:`\eta_k` is :math:`10^{-10}`; with a float32 operator about
        :math:`10^3` float32 epsilons. (Within :math:`\delta_k` of a node the bounds are
        therefore those of the two neighbouring gaps together.)

        ``probe=None`` returns the mean of the probes' bounds, which bound the probe average
        :math:`\frac1P\sum_k F_k(x)` (the distribution function the pooled density estimates).
        A density from :meth:`from_eigenvalues` is exact: both bounds are :meth:`cdf`.

        Returns ``(lower, upper)``, floats for a scalar ``x``, else arrays of its shape
        (NaN where ``x`` is NaN; so does :meth:`cdf_band`).

        Raises
        ------
        ValueError
            The density is not a quadrature (``source=None``), or ``probe`` is out of range.

        >>> d = SpectralDensity([0.0, 1.0, 2.0], [0.25, 0.5, 0.25], source="quadrature")
        >>> lo, hi = d.cdf_bounds([0.5, 1.5])
        >>> lo.round(6).tolist(), hi.round(6).tolist()
        ([0.0, 0.25], [0.75, 1.0])
        """
        self._require_bounds("cdf_bounds")
        xs = np.asarray(x, dtype=np.float64)
        if self.source == "eigenvalues":
            exact = np.asarray(self.cdf(xs), dtype=np.float64)
            return _out(exact), _out(exact.copy())
        rows, _ = self._rules()
        if probe is not None:
            if isinstance(probe, bool) or not isinstance(probe, int | np.integer):
                raise argument_error("probe", "None or an integer probe index", probe)
            if not -len(rows) <= probe < len(rows):
                raise argument_error("probe", f"an index in [0, {len(rows)})", probe)
            chosen = [int(probe) % len(rows)]
        else:
            chosen = list(range(len(rows)))
        assert self.probe_invariant is not None and self.probe_tolerance is not None
        lower = np.zeros(xs.shape)
        upper = np.zeros(xs.shape)
        for k in chosen:
            tol = float(self.probe_tolerance[k])
            scale = float(np.max(np.abs(rows[k][0])))
            eta = max(bounds.PROBABILITY_TOL, tol / scale if scale > 0 else 0.0)
            lo, hi = bounds.quadrature_cdf_bounds(
                rows[k][0],
                rows[k][1],
                xs,
                invariant=bool(self.probe_invariant[k]),
                tol=tol,
                probability_tol=eta,
            )
            lower += lo
            upper += hi
        return _out(lower / len(chosen)), _out(upper / len(chosen))

    def _kappa(self, probe_distribution: str | None, what: str) -> float:
        """The variance factor of the probes (see :func:`spectral.bounds.probe_variance_factor`)."""
        kind = probe_distribution if probe_distribution is not None else self.probe_kind
        if kind not in bounds.PROBE_VARIANCE:
            raise ValueError(
                f"{what}: the probes are {kind!r}, not random Rademacher, Gaussian or spherical "
                "vectors, so no concentration bound holds; pass probe_distribution=... if "
                "they were drawn independently from one of these."
            )
        if self.dimension is None:
            raise ValueError(f"{what}: the operator's dimension n is unknown (dimension=None).")
        return bounds.probe_variance_factor(str(kind), self.dimension)

    def cdf_band(
        self,
        x: ArrayLike,
        confidence: float = 0.95,
        *,
        simultaneous: bool = False,
        probe_distribution: str | None = None,
    ) -> tuple[Any, Any]:
        r"""A confidence band for the spectral distribution function :math:`\#\{\lambda_j\le x\}/n`.

        Combines the certified quadrature bounds :math:`\bar L \le \bar F \le \bar U` of the
        probe average (:meth:`cdf_bounds`) with Chebyshev's inequality for the average of
        ``P`` independent probes' quadratic forms :math:`F_v(x) = v^\top \mathbf 1[A\le x]\,v
        /\|v\|^2`, whose variance is at most :math:`\kappa F(1-F)` with :math:`\kappa = 2/n`
        for Rademacher probes and :math:`2/(n+2)` for Gaussian or spherical ones (exact Beta
        law). With :math:`c = \kappa/(P\alpha)`, :math:`\alpha = 1 - \text{confidence}`, the
        band is the set of :math:`F` with :math:`(\hat F - F)^2 \le cF(1-F)` for some
        :math:`\hat F \in [\bar L, \bar U]` (a Wilson-type inversion; see
        :mod:`spectral.bounds` and Chen, Trogdon & Ubaru 2021).

        Coverage is **pointwise**: for each fixed ``x``,
        :math:`\Pr[\ell(x) \le F(x) \le u(x)] \ge` ``confidence`` over the probes. With
        ``simultaneous=True`` the level is Bonferroni-corrected over the ``K`` points of
        ``x`` (all ``K`` covered at once with probability ``>= confidence``).
        Valid for independent Rademacher, Gaussian or spherical probes (the density's
        ``probe_kind``, or ``probe_distribution`` for explicit probes drawn so). Its width
        depends on the spectrum and on where ``x`` lies: at ``n = 2000``, ``m = 60``,
        ``P = 10``, over the 10-90 % quantiles of the eigenvalues, the 95% band was 0.085
        wide on average (at most 0.096) for eigenvalues ``linspace(0, 1, n)`` and 0.090 (at
        most 0.15) for ``linspace(0, 1, n) ** 3``: 0.045 from the probes, the rest the
        quadrature gap of about two weights.
        For exact eigenvalues the band is :meth:`cdf` itself.

        >>> import numpy as np
        >>> from spectral import slq
        >>> d = slq(np.diag(np.linspace(0.0, 1.0, 400)), 20, num_probes=4, seed=0)
        >>> lo, hi = d.cdf_band(0.5)
        >>> bool(lo <= 0.5025 <= hi), bool(hi - lo < 0.5)
        (True, True)
        """
        self._require_bounds("cdf_band")
        if self.source == "eigenvalues":
            return self.cdf_bounds(x)
        kappa = self._kappa(probe_distribution, "cdf_band")
        lo, hi = self.cdf_bounds(x)
        band_lo, band_hi = bounds.wilson_chebyshev(
            lo, hi, kappa, self.num_probes, confidence, simultaneous=simultaneous
        )
        return _out(band_lo), _out(band_hi)

    def expectation_interval(
        self,
        f: Callable[[FloatArray], ArrayLike],
        confidence: float = 0.95,
        *,
        support: tuple[float, float] | None = None,
        probe_distribution: str | None = None,
        resolution: int = 33,
    ) -> tuple[float, float]:
        r"""A confidence interval for :math:`\mathrm{tr}\,f(A)/n = \int f\,d\mu`.

        Per probe, the quantile form of the Chebyshev–Markov–Stieltjes inequalities bounds
        :math:`\int f\,d\mu_k` by :math:`\sum_i \tau_i \min_{J_i} f` and
        :math:`\sum_i \tau_i \max_{J_i} f`, :math:`J_i = [\theta_{i-1}, \theta_{i+1}]`
        (:func:`spectral.bounds.quadrature_expectation_bounds`; the extrema are exact for
        ``f`` monotone on each :math:`J_i`, otherwise taken on ``resolution`` points).
        The probe average then lies within :math:`\omega\sqrt{\kappa/(4P\alpha)}` of
        :math:`\int f\,d\mu` with probability :math:`\ge 1 - \alpha` (Chebyshev;
        :math:`\omega = \sup f - \inf f` on the support, :math:`\kappa` as in
        :meth:`cdf_band`).

        ``support=(a, b)`` must contain the spectrum of ``A`` (e.g. ``(0, ‖A‖)`` for a PSD
        operator); the interval is certified only then. Ritz values lie in the spectrum's
        hull in exact arithmetic, so a node of probe ``k`` may lie outside ``(a, b)`` by its
        accuracy :math:`\delta_k` (:attr:`probe_tolerance`: a few :math:`\varepsilon\|A\|`, or
        the dropped residual after an early stop):
        ``support=(eigvalsh(A).min(), eigvalsh(A).max())`` is accepted. A node further out
        proves that the support is wrong and raises ``ValueError``. Without ``support``, the
        range of all probes' nodes widened by 1% of its width on each side is used, which is
        exact in the limit of converged extreme Ritz values but **not** guaranteed.

        >>> import numpy as np
        >>> from spectral import slq
        >>> d = slq(np.diag(np.linspace(0.0, 1.0, 400)), 20, num_probes=4, seed=0)
        >>> lo, hi = d.expectation_interval(np.exp, support=(0.0, 1.0))
        >>> bool(lo <= np.exp(np.linspace(0.0, 1.0, 400)).mean() <= hi)
        True
        """
        resolution = check_integer(
            "resolution", resolution, "an integer >= 2 (grid points per interval)", lambda k: k >= 2
        )
        return self._interval(f, None, confidence, support, probe_distribution, resolution)

    def moment_interval(
        self,
        p: int,
        confidence: float = 0.95,
        *,
        support: tuple[float, float] | None = None,
        probe_distribution: str | None = None,
    ) -> tuple[float, float]:
        r"""A confidence interval for the moment :math:`\mathrm{tr}(A^p)/n`.

        As :meth:`expectation_interval` with :math:`f(x) = x^p`, except that for
        :math:`p \le 2m_k - 1` the Gauss rule of probe ``k`` reproduces :math:`\int x^p
        d\mu_k` exactly, so only the probe fluctuation (and rounding,
        :math:`p\,\delta_k \max|\theta|^{p-1}`) remains.

        >>> import numpy as np
        >>> from spectral import slq
        >>> d = slq(np.diag(np.linspace(0.0, 1.0, 400)), 20, num_probes=4, seed=0)
        >>> lo, hi = d.moment_interval(1, support=(0.0, 1.0))
        >>> bool(lo <= 0.5 <= hi)
        True
        """
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 0:
            raise argument_error("p", "a non-negative integer", p)
        k = int(p)
        return self._interval(lambda t: t**k, k, confidence, support, probe_distribution, 33)

    def trace_interval(
        self,
        confidence: float = 0.95,
        *,
        support: tuple[float, float] | None = None,
        probe_distribution: str | None = None,
    ) -> tuple[float, float]:
        r"""A confidence interval for :math:`\mathrm{tr}\,A`: ``n`` times ``moment_interval(1)``.

        >>> import numpy as np
        >>> from spectral import slq
        >>> d = slq(np.diag(np.linspace(0.0, 1.0, 400)), 20, num_probes=4, seed=0)
        >>> lo, hi = d.trace_interval(support=(0.0, 1.0))
        >>> bool(lo <= 200.0 <= hi)
        True
        """
        lo, hi = self.moment_interval(
            1, confidence, support=support, probe_distribution=probe_distribution
        )
        n = self.dimension
        if n is None:
            raise ValueError("trace_interval: the operator's dimension n is unknown.")
        return n * lo, n * hi

    def _interval(
        self,
        f: Callable[[FloatArray], ArrayLike],
        power: int | None,
        confidence: float,
        support: tuple[float, float] | None,
        probe_distribution: str | None,
        resolution: int,
    ) -> tuple[float, float]:
        self._require_bounds("expectation_interval")
        if self.source == "eigenvalues":
            value = self.expectation(f)
            return value, value
        kappa = self._kappa(probe_distribution, "expectation_interval")
        rows, counts = self._rules()
        if support is None:
            lo_all, hi_all = float(self.nodes[0]), float(self.nodes[-1])
            pad = 0.01 * (hi_all - lo_all)
            a, b = lo_all - pad, hi_all + pad
        else:
            try:
                a, b = float(support[0]), float(support[1])
            except (TypeError, IndexError, ValueError) as exc:
                raise argument_error("support", "a pair (a, b) of numbers", support) from exc
            if not (np.isfinite(a) and np.isfinite(b) and a <= b):
                raise argument_error("support", "finite (a, b) with a <= b", support)
            self._check_support(a, b, support)
        assert self.probe_invariant is not None and self.probe_tolerance is not None
        lows, highs = [], []
        for k, ((theta, tau), count) in enumerate(zip(rows, counts)):
            tol = float(self.probe_tolerance[k])
            if power is not None and power <= 2 * count - 1:
                value = float(tau @ theta**power)
                scale = float(np.max(np.abs(theta))) + tol
                slack = power * tol * scale ** max(power - 1, 0) + 1e-12 * abs(value)
                lows.append(value - slack)
                highs.append(value + slack)
                continue
            lo, hi = bounds.quadrature_expectation_bounds(
                theta,
                tau,
                f,
                (a, b),
                invariant=bool(self.probe_invariant[k]),
                tol=tol,
                resolution=resolution,
            )
            lows.append(lo)
            highs.append(hi)
        grid = np.linspace(a, b, 1025)
        values = np.asarray(f(grid), dtype=np.float64)
        if power is not None:  # x^p on [a, b]: extremes at the ends or at 0
            if a < 0.0 < b:
                values = np.concatenate([values, np.asarray(f(np.zeros(1)), dtype=np.float64)])
        oscillation = float(values.max() - values.min())
        half = bounds.chebyshev_halfwidth(oscillation, kappa, self.num_probes, confidence)
        return float(np.mean(lows)) - half, float(np.mean(highs)) + half

    def _check_support(self, a: float, b: float, support: object) -> None:
        """Refuse a support that misses a node by more than its probe's accuracy delta_k."""
        assert self.probe_tolerance is not None
        rows, _ = self._rules()
        for k, (theta, _tau) in enumerate(rows):
            slack = float(self.probe_tolerance[k])  # Ritz values lie in [λ_min, λ_max]
            if theta.size and (theta.min() < a - slack or theta.max() > b + slack):
                raise argument_error(
                    "support",
                    "an interval containing every node up to its rounding delta_k "
                    f"(probe {k}: nodes [{theta.min()!r}, {theta.max()!r}], "
                    f"delta_k = {slack:.3g})",
                    support,
                )

    def negative_mass(self, tol: float = 0.0) -> float:
        r"""Return the mass strictly below ``-tol``: :math:`\sum_{\theta_i < -\mathrm{tol}} w_i`.

        A small ``tol`` ignores Ritz values that are negative only by rounding or by a
        tiny shift (the paper's Ritz value at :math:`-3\times10^{-4}`).

        >>> d = SpectralDensity([-1e-4, -1.0, 2.0], [0.3, 0.2, 0.5])
        >>> d.negative_mass(), d.negative_mass(tol=1e-3)
        (0.5, 0.2)
        """
        tol = check_real("tol", tol, "a finite number >= 0", lambda t: 0 <= t < math.inf)
        return float(self.weights[self.nodes < -tol].sum())

    def smooth(self, grid: ArrayLike, sigma: float, kernel: str = "gaussian") -> FloatArray:
        r"""Evaluate the smoothed density :math:`\sum_i w_i K_\sigma(x - \theta_i)` on ``grid``.

        ``"gaussian"``: :math:`K_\sigma(t) = e^{-t^2/2\sigma^2}/(\sigma\sqrt{2\pi})`;
        ``"lorentzian"``: :math:`K_\sigma(t) = \sigma/(\pi(t^2 + \sigma^2))`. Both integrate to
        1 over :math:`\mathbb{R}`, hence so does :math:`\rho_\sigma`; on a finite grid the
        integral is 1 minus the kernel mass outside it (heavy for the Lorentzian tails).

        Parameters
        ----------
        grid:
            Points ``x`` (any shape).
        sigma:
            Kernel width, > 0.
        kernel:
            ``"gaussian"`` or ``"lorentzian"``.

        Returns
        -------
        Density values, float64 with the shape of ``grid``.

        >>> d = SpectralDensity([0.0], [1.0])
        >>> x = np.linspace(-10, 10, 2001)
        >>> round(float(np.trapezoid(d.smooth(x, 0.5), x)), 10)
        1.0
        """
        sigma = kernel_width(sigma)
        if kernel not in KERNELS:
            raise argument_error("kernel", f"one of {KERNELS}", kernel)
        xs = np.asarray(grid, dtype=np.float64)
        flat = xs.reshape(-1)
        out = np.zeros(flat.size)
        # Accumulate in blocks of nodes to bound memory at O(grid * block).
        block = max(1, 2**20 // max(1, flat.size))
        for start in range(0, self.nodes.size, block):
            # t and t * t overflow to inf only far in the tails, where the kernel's limit,
            # 0, is the exact value to float64 precision
            with np.errstate(over="ignore"):
                t = (flat[:, None] - self.nodes[None, start : start + block]) / sigma
                if kernel == "gaussian":
                    k = np.exp(-0.5 * t * t) / (sigma * np.sqrt(2.0 * np.pi))
                else:
                    k = 1.0 / (np.pi * sigma * (1.0 + t * t))
            out += k @ self.weights[start : start + block]
        result: FloatArray = out.reshape(xs.shape)
        return result

    def smoothed_mass(self, a: float, b: float, sigma: float, kernel: str = "gaussian") -> float:
        r"""Exact mass :math:`\int_a^b \rho_\sigma(x)\,dx` of the smoothed density on ``[a, b]``.

        ``a <= b`` (either may be infinite, e.g. ``(-inf, x)`` for the distribution function
        of :math:`\rho_\sigma`), ``sigma > 0``, ``kernel`` as in :meth:`smooth`.

        >>> round(SpectralDensity([0.0], [1.0]).smoothed_mass(-1.0, 1.0, 1.0, "lorentzian"), 12)
        0.5
        """
        sigma = kernel_width(sigma)
        if kernel not in KERNELS:
            raise argument_error("kernel", f"one of {KERNELS}", kernel)
        a = check_real("a", a, "a number (or -inf), not NaN", lambda t: not math.isnan(t))
        b = check_real("b", b, f"a number >= a = {a!r} (or inf)", lambda t: t >= a)
        with np.errstate(over="ignore"):  # +-inf: the exact limits 0 and 1 of the CDFs below
            lo = (a - self.nodes) / sigma
            hi = (b - self.nodes) / sigma
        if kernel == "gaussian":
            per_node = scipy.special.ndtr(hi) - scipy.special.ndtr(lo)
        else:
            per_node = (np.arctan(hi) - np.arctan(lo)) / np.pi
        return float(np.dot(self.weights, per_node))

    def wasserstein(self, other: SpectralDensity | ArrayLike) -> float:
        r"""Return the 1-Wasserstein distance :math:`W_1 = \int |F(x) - G(x)|\,dx`.

        ``other`` is another :class:`SpectralDensity` or an array of (exact) eigenvalues,
        read as the uniform measure on them. Computed by
        :func:`scipy.stats.wasserstein_distance`.  Like the constructor's ``nodes``, the
        eigenvalues must be real: complex values (whose imaginary parts numpy would drop)
        and non-numeric input (strings, ``None``) raise a ``TypeError`` naming ``other``.

        >>> SpectralDensity([0.0], [1.0]).wasserstein([1.0, 3.0])
        2.0
        """
        if isinstance(other, SpectralDensity):
            values, weights = other.nodes, other.weights
        else:
            values = _real_values("other", other)
            weights = np.full(values.size, 1.0 / values.size)
        return float(scipy.stats.wasserstein_distance(self.nodes, values, self.weights, weights))

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, Any]:
        """The arrays written by :meth:`save` (``nodes``, ``weights``, optional per-probe data)."""
        arrays: dict[str, Any] = {
            "format": np.str_(_FORMAT),
            "nodes": np.asarray(self.nodes),
            "weights": np.asarray(self.weights),
        }
        if self.probe_nodes is not None and self.probe_weights is not None:
            arrays["probe_nodes"] = np.asarray(self.probe_nodes)
            arrays["probe_weights"] = np.asarray(self.probe_weights)
        if self.source is not None:
            arrays["source"] = np.str_(self.source)
        if self.dimension is not None:
            arrays["dimension"] = np.int64(self.dimension)
        if self.probe_kind is not None:
            arrays["probe_kind"] = np.str_(self.probe_kind)
        if self.probe_invariant is not None and self.probe_tolerance is not None:
            arrays["probe_invariant"] = np.asarray(self.probe_invariant)
            arrays["probe_tolerance"] = np.asarray(self.probe_tolerance)
        return arrays

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the density to an ``.npz`` file atomically (no pickled objects).

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "d.npz")
        >>> SpectralDensity([0.0, 1.0], [0.5, 0.5]).save(p)
        >>> SpectralDensity.load(p).nodes.tolist()
        [0.0, 1.0]
        """
        save_npz(path, **self.to_arrays())

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, source: str = "arrays") -> SpectralDensity:
        """Build a density from :meth:`to_arrays` output or a workflow spectrum file.

        Workflow spectrum files (``w``/``gammas`` keys, see the team's file formats) are
        accepted as well.
        """
        if "nodes" in arrays and "weights" in arrays:
            nodes, weights = arrays["nodes"], arrays["weights"]
        elif "w" in arrays and "gammas" in arrays:
            nodes, weights = arrays["w"], arrays["gammas"]
        else:
            raise CorruptFileError(
                f"'{source}' holds no spectral density (keys 'nodes'/'weights' or "
                f"'w'/'gammas' expected; found {sorted(arrays)})."
            )
        pn, pw = arrays.get("probe_nodes"), arrays.get("probe_weights")
        try:
            provenance: dict[str, Any] = {}
            for key in ("source", "probe_kind"):
                if key in arrays:
                    provenance[key] = str(np.asarray(arrays[key]).item())
            if "dimension" in arrays:  # checked by the constructor: 2.7 is no dimension
                provenance["dimension"] = np.asarray(arrays["dimension"]).item()
            for key in ("probe_invariant", "probe_tolerance"):
                if key in arrays:
                    provenance[key] = np.asarray(arrays[key])
            return cls(nodes, weights, probe_nodes=pn, probe_weights=pw, **provenance)
        except (TypeError, ValueError) as exc:
            raise CorruptFileError(f"'{source}' holds an invalid spectral density: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpectralDensity:
        """Read a density written by :meth:`save` (or a workflow spectrum ``.npz``).

        Raises
        ------
        FileNotFoundError
            No such file.
        CorruptFileError
            Truncated/corrupted file, pickled content, missing keys or an invalid measure.
        """
        return cls.from_arrays(load_npz(path), source=str(path))

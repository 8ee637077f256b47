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

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.special
import scipy.stats
from numpy.typing import ArrayLike, NDArray

from spectral.errors import argument_error
from spectral.io import CorruptFileError, load_npz, save_npz

__all__ = ["KERNELS", "SpectralDensity"]

FloatArray = NDArray[np.float64]
KERNELS = ("gaussian", "lorentzian")
_FORMAT = "spectral.SpectralDensity/1"
# Weights within this (relative to 1) of a probability vector are renormalised silently.
_SUM_TOL = 1e-8


def _as_probability(weights: FloatArray, name: str) -> FloatArray:
    """Check that ``weights`` is a probability vector up to rounding and renormalise it."""
    if weights.size and weights.min() < -_SUM_TOL:
        raise argument_error(name, "non-negative weights", weights)
    total = float(weights.sum())
    if abs(total - 1.0) > _SUM_TOL * max(1, weights.size):
        raise argument_error(name, f"weights summing to 1 (they sum to {total!r})", weights)
    clipped = np.clip(weights, 0.0, None)
    out: FloatArray = clipped / clipped.sum()
    return out


def _readonly(a: FloatArray) -> FloatArray:
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

    Raises
    ------
    ValueError
        Shapes disagree, non-finite nodes, negative weights or weights not summing to 1.

    The object is immutable (its arrays are read-only).

    >>> d = SpectralDensity([2.0, -1.0], [0.5, 0.5])
    >>> d.nodes.tolist(), d.negative_mass()
    ([-1.0, 2.0], 0.5)
    """

    __slots__ = ("nodes", "probe_nodes", "probe_weights", "weights")

    nodes: FloatArray
    weights: FloatArray
    probe_nodes: FloatArray | None
    probe_weights: FloatArray | None

    def __init__(
        self,
        nodes: ArrayLike,
        weights: ArrayLike,
        probe_nodes: ArrayLike | None = None,
        probe_weights: ArrayLike | None = None,
    ) -> None:
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
        w = _as_probability(w, "weights")
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
                pw[k, ~np.isnan(pw[k])] = _as_probability(row, f"probe_weights[{k}]")
            self.probe_nodes = _readonly(pn)
            self.probe_weights = _readonly(pw)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_probes(cls, probe_nodes: ArrayLike, probe_weights: ArrayLike) -> SpectralDensity:
        r"""Pool ``P`` per-probe measures (rows, NaN-padded) into :math:`\frac1P\sum_k \hat\mu_k`.

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
        return cls(nodes, weights, probe_nodes=pn, probe_weights=pw)

    @classmethod
    def from_eigenvalues(cls, eigenvalues: ArrayLike) -> SpectralDensity:
        r"""The empirical spectral measure :math:`\frac1n\sum_j \delta_{\lambda_j}`.

        >>> SpectralDensity.from_eigenvalues([1.0, 2.0, 3.0, 4.0]).moment(1)
        2.5
        """
        lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
        if lam.size == 0:
            raise argument_error("eigenvalues", "a non-empty array", eigenvalues)
        return cls(lam, np.full(lam.size, 1.0 / lam.size))

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
        values = np.asarray(f(self.nodes.copy()), dtype=np.float64)
        if values.shape != self.nodes.shape:
            raise argument_error(
                "f", f"a vectorised function returning shape {self.nodes.shape}", f
            )
        return float(np.dot(self.weights, values))

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
            values = np.asarray(f(self.probe_nodes[k][keep].copy()), dtype=np.float64)
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

        Scalars give a float, arrays an array of the same shape.

        >>> SpectralDensity([0.0, 1.0], [0.5, 0.5]).cdf(0.0)
        0.5
        """
        xs = np.asarray(x, dtype=np.float64)
        cumulative = np.concatenate([[0.0], np.minimum(np.cumsum(self.weights), 1.0)])
        idx = np.searchsorted(self.nodes, xs, side="right")
        out = cumulative[idx]
        # The total mass is exactly one beyond the last node.
        out = np.where(xs >= self.nodes[-1], 1.0, out)
        if out.ndim == 0:
            return float(out)
        return out

    def negative_mass(self, tol: float = 0.0) -> float:
        r"""Return the mass strictly below ``-tol``: :math:`\sum_{\theta_i < -\mathrm{tol}} w_i`.

        A small ``tol`` ignores Ritz values that are negative only by rounding or by a
        tiny shift (the paper's Ritz value at :math:`-3\times10^{-4}`).

        >>> d = SpectralDensity([-1e-4, -1.0, 2.0], [0.3, 0.2, 0.5])
        >>> d.negative_mass(), d.negative_mass(tol=1e-3)
        (0.5, 0.2)
        """
        if not (np.isfinite(tol) and tol >= 0):
            raise argument_error("tol", "a non-negative number", tol)
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
        if not (np.isfinite(sigma) and sigma > 0):
            raise argument_error("sigma", "a positive number", sigma)
        if kernel not in KERNELS:
            raise argument_error("kernel", f"one of {KERNELS}", kernel)
        xs = np.asarray(grid, dtype=np.float64)
        flat = xs.reshape(-1)
        out = np.zeros(flat.size)
        # Accumulate in blocks of nodes to bound memory at O(grid * block).
        block = max(1, 2**20 // max(1, flat.size))
        for start in range(0, self.nodes.size, block):
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

        >>> round(SpectralDensity([0.0], [1.0]).smoothed_mass(-1.0, 1.0, 1.0, "lorentzian"), 12)
        0.5
        """
        if not (np.isfinite(sigma) and sigma > 0):
            raise argument_error("sigma", "a positive number", sigma)
        if kernel not in KERNELS:
            raise argument_error("kernel", f"one of {KERNELS}", kernel)
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
        :func:`scipy.stats.wasserstein_distance`.

        >>> SpectralDensity([0.0], [1.0]).wasserstein([1.0, 3.0])
        2.0
        """
        if isinstance(other, SpectralDensity):
            values, weights = other.nodes, other.weights
        else:
            values = np.asarray(other, dtype=np.float64).reshape(-1)
            if values.size == 0 or not np.all(np.isfinite(values)):
                raise argument_error(
                    "other", "a SpectralDensity or a non-empty array of finite reals", other
                )
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
            return cls(nodes, weights, probe_nodes=pn, probe_weights=pw)
        except ValueError as exc:
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

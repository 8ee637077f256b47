r"""Random-matrix fits of a spectrum: Marchenko–Pastur and semicircle bulks, and their outliers.

A Hessian or covariance spectrum is often read as a *bulk* that follows a random-matrix law
plus a few *outliers*. This module fits the bulk and finds the outliers.

Fits (method of moments with outlier trimming)
----------------------------------------------
* **Marchenko–Pastur** (:func:`fit_marchenko_pastur`): the spectrum of
  :math:`X^\top X/p` for :math:`X \in \mathbb{R}^{p\times n}` with i.i.d. entries of variance
  :math:`\sigma^2`, ratio :math:`q = n/p`. Its moments are :math:`\int x\,d\mu = \sigma^2`
  and :math:`\int x^2 d\mu = \sigma^4(1 + q)` (the atom :math:`1 - 1/q` at 0 for
  :math:`q > 1` included), hence :math:`\hat\sigma^2 = m_1`, :math:`\hat q = s^2/m_1^2`
  with :math:`s^2 = m_2 - m_1^2` the variance.
* **Semicircle** (:func:`fit_semicircle`): centre :math:`c = m_1`, radius
  :math:`r = 2s` (its variance is :math:`r^2/4`).

The standard deviation :math:`s` is computed from the centred points
:math:`x_i - m_1`, scaled by a power of two (exact) before squaring, never as
:math:`\sqrt{m_2 - m_1^2}`: the fits are exactly equivariant under scaling by powers of two,
change under a shift only by the rounding of the shifted points, and accept spectra of any
magnitude the float64 range holds (:math:`10^{\pm 160}` overflowed :math:`m_2`).

The moments are taken from exact eigenvalues or from a :class:`~spectral.SpectralDensity`.
For an SLQ density they are the Gauss-quadrature moments, which equal
:math:`\frac1P\sum_k v_k^\top A^p v_k/\|v_k\|^2` **exactly** for :math:`p \le 2m - 1`
(every ``m >= 2``): the fit then differs from the exact-eigenvalue fit only by the probe
fluctuation (variance :math:`O(1/(nP))`), never by quadrature error. Outliers bias moments
(an eigenvalue :math:`\ell` adds :math:`\ell^2/n` to :math:`m_2`), so the fit is iterated:
points (or nodes) beyond the fitted edges by more than ``num_scales`` edge scales are
dropped and the remaining mass renormalised, until the kept set is stable. For a density
the margin also includes :math:`3(b - a)\sqrt{2/(nP)}`, the probe fluctuation of the fitted
edges, and Marchenko–Pastur fits trim only above the bulk (Gauss nodes may lie in the gap
between the atom at 0 and the continuous part). Without the dimension ``n`` nothing is
trimmed.

Goodness of fit: the 1-Wasserstein distance :math:`W_1 = \int|F - F_{\text{fit}}|\,dx`
(:func:`scipy.stats.wasserstein_distance` against 20,000 quantiles of the fitted law) and
the Kolmogorov distance :math:`\sup_x|F(x) - F_{\text{fit}}(x)|`, both over the kept bulk.
For a Marchenko–Pastur fit with an atom at 0 (:math:`q > 1`), points within
:math:`\min(\text{slack}, a/2)` of 0 count as the atom (are set to 0 for the distances):
``slack`` is the trimming margin above (``num_scales`` edge scales plus the probe margin;
no limit without trimming or without ``n``) and :math:`a = \sigma^2(1 - \sqrt q)^2` the
lower edge of the continuous part. The zero eigenvalues of a rank-deficient matrix come out
of an eigensolver as :math:`\pm 10^{-15}`; pooled, they give the statistics of exact zeros
(a Kolmogorov distance of 0.25 to 0.5 otherwise: half of the atom on the wrong side).

Edges and outliers
------------------
The largest bulk eigenvalue fluctuates on the Tracy–Widom scale :math:`n^{-2/3}`:
for the semicircle of radius :math:`r`, :math:`\lambda_{\max} \approx c + r +
\tfrac r2 n^{-2/3}\,\mathrm{TW}_1`; for Marchenko–Pastur (Johnstone 2001, with
:math:`p = n/q` samples) :math:`\lambda_{\max} \approx \sigma^2(1+\sqrt q)^2 + \sigma^2
p^{-2/3}(1 + \sqrt q)(1 + 1/\sqrt q)^{1/3}\,\mathrm{TW}_1`. :func:`outliers` returns the
eigenvalues beyond an edge by more than ``num_scales`` (default 4) such scales; the 99%
quantile of :math:`\mathrm{TW}_1` is about 2.02.

Spikes (Baik–Ben Arous–Péché): a population covariance :math:`I + \theta uu^\top` produces
an outlier at :math:`\sigma^2(1+\theta)(1 + q/\theta)` when :math:`\theta > \sqrt q`
(:func:`bbp_covariance`); a Wigner matrix plus :math:`\theta uu^\top` (semicircle radius
:math:`r = 2s`) at :math:`\theta + s^2/\theta` when :math:`\theta > s` (:func:`bbp_wigner`).

>>> from spectral import synthetic
>>> lam = synthetic.wishart_operator(1000, 500, seed=0).eigenvalues()
>>> fit = fit_marchenko_pastur(lam)
>>> round(fit.ratio, 1), round(fit.variance, 1)
(2.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike, NDArray

from spectral.density import SpectralDensity
from spectral.errors import argument_error, check_integer, check_real

__all__ = [
    "MarchenkoPasturFit",
    "Outliers",
    "SemicircleFit",
    "bbp_covariance",
    "bbp_wigner",
    "fit_marchenko_pastur",
    "fit_semicircle",
    "outliers",
    "probe_margin",
]

FloatArray = NDArray[np.float64]
_QUANTILES = 20_000
_TABLE = 4097
_MAX_ROUNDS = 50


def _data(density_or_eigenvalues: Any) -> tuple[FloatArray, FloatArray, int | None, str]:
    """(points, weights summing to 1, dimension n or None, description of the source)."""
    if isinstance(density_or_eigenvalues, SpectralDensity):
        d = density_or_eigenvalues
        how = "quadrature moments" if d.source == "quadrature" else "density moments"
        return np.array(d.nodes), np.array(d.weights), d.dimension, how
    lam = np.asarray(density_or_eigenvalues, dtype=np.float64)
    if lam.ndim != 1:  # a matrix instead of its eigenvalues would be flattened, silently
        raise argument_error(
            "density_or_eigenvalues",
            "a SpectralDensity or a 1-D array of eigenvalues (not the matrix itself)",
            f"an array of shape {lam.shape}",
        )
    if lam.size < 2 or not np.all(np.isfinite(lam)):
        raise argument_error(
            "density_or_eigenvalues",
            "a SpectralDensity or at least two finite eigenvalues",
            density_or_eigenvalues,
        )
    return lam, np.full(lam.size, 1.0 / lam.size), lam.size, "eigenvalue moments"


def _unit_scaled(v: FloatArray) -> tuple[FloatArray, int]:
    """``(v * 2**-e, e)`` with ``2**e`` the power of two just above ``max|v|`` (0 for zero ``v``).

    Exact (a power of two): the scaled entries have magnitudes in ``[1/2, 1)`` at most and
    their squares neither overflow nor underflow.
    """
    largest = float(np.max(np.abs(v))) if v.size else 0.0
    exponent = math.frexp(largest)[1] if 0.0 < largest < math.inf else 0
    return np.ldexp(v, -exponent), exponent


def _moments(x: FloatArray, w: FloatArray) -> tuple[float, float]:
    r"""Mean :math:`m` and standard deviation :math:`s` of :math:`\sum_i w_i\delta_{x_i}`.

    (The weights are normalised by their sum.)

    :math:`s^2 = \sum_i w_i (x_i - m)^2` is summed over the *centred* points, each scaled
    by a power of two (exact) near their largest magnitude: the raw-moment form
    :math:`m_2 - m_1^2` cancels catastrophically for a bulk far from 0 (a semicircle of
    radius 2 shifted by :math:`10^8` came out with radius 2.83), and :math:`x^2`
    overflows or underflows for spectra scaled by :math:`10^{\pm 160}`. So both are
    exactly equivariant under scaling by powers of two (:math:`m(2^k x) = 2^k m(x)`,
    bitwise), and under a shift :math:`c` they change only by the rounding of
    :math:`c + x_i` (at most :math:`\varepsilon\max|c + x_i|/2` for :math:`s`, which is
    1-Lipschitz in the points). The mean is refined once by the mean of the deviations
    (corrected two-pass algorithm), so its summation error is relative to :math:`s`, not
    to :math:`\max|x|`.
    """
    total = float(w.sum())
    y, e = _unit_scaled(x)
    mean = float(w @ y) / total
    mean += float(w @ (y - mean)) / total  # one refinement: the error of the sum, O(eps * s)
    z, f = _unit_scaled(y - mean)
    std = math.sqrt(float(w @ (z * z)) / total)
    return math.ldexp(mean, e), math.ldexp(std, e + f)


def _distances(x: FloatArray, w: FloatArray, fit: Any) -> tuple[float, float]:
    """(W1, Kolmogorov) between the measure sum w_i delta_{x_i} (normalised) and ``fit``."""
    w = w / w.sum()
    s = (np.arange(_QUANTILES) + 0.5) / _QUANTILES
    w1 = float(scipy.stats.wasserstein_distance(x, fit.quantile(s), w))
    xs, inverse = np.unique(x, return_inverse=True)  # ties (atoms) pooled
    cw = np.cumsum(np.bincount(inverse.reshape(-1), weights=w, minlength=xs.size))
    left = np.concatenate([[0.0], cw[:-1]])
    ks = float(max(np.max(np.abs(cw - fit.cdf(xs))), np.max(np.abs(left - fit.cdf(xs, left=True)))))
    return w1, ks


@dataclass(frozen=True)
class MarchenkoPasturFit:
    r"""A fitted Marchenko–Pastur law (see the module docstring).

    Attributes
    ----------
    ratio, variance:
        :math:`q = n/p` and :math:`\sigma^2`.
    support:
        The edges :math:`\sigma^2(1 \mp \sqrt q)^2` of the continuous part.
    wasserstein, kolmogorov:
        Distances between the (kept) data and the fitted law.
    bulk_mass:
        Mass of the data kept in the bulk (1 minus the trimmed outliers).
    dimension:
        ``n`` when known (sets the edge scale).
    method:
        How the moments were obtained.

    Examples
    --------
    >>> fit = MarchenkoPasturFit.from_parameters(0.25)
    >>> fit.support
    (0.25, 2.25)
    """

    ratio: float
    variance: float
    support: tuple[float, float]
    wasserstein: float = field(default=float("nan"))
    kolmogorov: float = field(default=float("nan"))
    bulk_mass: float = 1.0
    dimension: int | None = None
    method: str = "given"

    @classmethod
    def from_parameters(
        cls, ratio: float, variance: float = 1.0, dimension: int | None = None
    ) -> MarchenkoPasturFit:
        """The law with the given ``ratio`` and ``variance`` (no data, no distances).

        >>> MarchenkoPasturFit.from_parameters(0.25).support
        (0.25, 2.25)
        """
        if not (np.isfinite(ratio) and ratio > 0):
            raise argument_error("ratio", "a positive number", ratio)
        if not (np.isfinite(variance) and variance > 0):
            raise argument_error("variance", "a positive number", variance)
        root = np.sqrt(ratio)
        support = (float(variance * (1 - root) ** 2), float(variance * (1 + root) ** 2))
        return cls(float(ratio), float(variance), support, dimension=dimension)

    @property
    def atom(self) -> float:
        """Mass :math:`\\max(0, 1 - 1/q)` at zero."""
        return max(0.0, 1.0 - 1.0 / self.ratio)

    def pdf(self, x: ArrayLike) -> FloatArray:
        r"""Density of the continuous part, :math:`\sqrt{(b-x)(x-a)}/(2\pi\sigma^2 q x)`.

        >>> float(MarchenkoPasturFit.from_parameters(0.25).pdf(1.0))
        0.6164...
        """
        a, b = self.support
        xs = np.asarray(x, dtype=np.float64)
        inside = (xs > a) & (xs < b) & (xs > 0)
        safe = np.where(inside, xs, b)
        # scale-free factors: no product of two lengths (which overflows at 1e160)
        root = np.sqrt(np.clip(b - safe, 0.0, None)) * np.sqrt(np.clip(safe - a, 0.0, None))
        val = root / safe / self.variance / (2.0 * np.pi * self.ratio)
        out: FloatArray = np.where(inside, val, np.where(np.isnan(xs), np.nan, 0.0))
        return out

    def _table(self) -> tuple[FloatArray, FloatArray]:
        r"""(u, continuous CDF) at :math:`x = a + (b - a) u`, :math:`u = (1 - \cos\phi)/2`:
        a smooth integrand in :math:`\phi`.

        Scale-free: with :math:`b - a = 4\sigma^2\sqrt q` the integrand
        :math:`h^2\sin^2\phi / (2\pi\sigma^2 q x)` (:math:`h = (b - a)/2`) is
        :math:`\sqrt q\,\sin^2\phi / (2\pi q\,(\alpha + u))`,
        :math:`\alpha = a/(b - a) = (1 - \sqrt q)^2 / (4\sqrt q)`, a function of
        :math:`q` alone.  Tabulated in :math:`u`, not in :math:`x`: at a subnormal scale
        (a support near 1e-310) interpolating in :math:`x` divided by spacings of 1e-317,
        and the slope overflowed (a Kolmogorov distance of inf).
        """
        q = self.ratio
        root = np.sqrt(q)
        alpha = (1.0 - root) ** 2 / (4.0 * root)
        phi = np.linspace(0.0, np.pi, _TABLE)
        us = (1.0 - np.cos(phi)) / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            g = root * np.sin(phi) ** 2 / (2 * np.pi * q * (alpha + us))
        if alpha == 0.0:  # q = 1: sin^2(phi) / u -> 4 at phi = 0
            g[0] = root * 4.0 / (2 * np.pi * q)
        cum = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2.0 * np.diff(phi))])
        cum *= min(1.0, 1.0 / q) / cum[-1]
        return us, cum

    def cdf(self, x: ArrayLike, *, left: bool = False) -> FloatArray:
        """Distribution function (with the atom at 0); ``left`` gives the left limit."""
        xs = np.asarray(x, dtype=np.float64)
        tu, tc = self._table()
        a, b = self.support
        with np.errstate(over="ignore", invalid="ignore"):  # x = +-inf: u = +-inf, interp clips
            u = (xs - a) / (b - a)
        cont = np.interp(u, tu, tc, left=0.0, right=float(tc[-1]))
        at_zero = (xs > 0) if left else (xs >= 0)
        out: FloatArray = cont + self.atom * at_zero
        return out

    def quantile(self, s: ArrayLike) -> FloatArray:
        """Quantile function :math:`F^{-1}(s)` for ``s`` in ``(0, 1)``."""
        ss = np.asarray(s, dtype=np.float64)
        tu, tc = self._table()
        a, b = self.support
        cont = a + (b - a) * np.interp(np.clip(ss - self.atom, 0.0, None), tc, tu)
        out: FloatArray = np.where(ss <= self.atom, 0.0, cont)
        return out

    def edge_scale(self, n: int | None = None) -> float:
        r"""Tracy–Widom scale :math:`\sigma^2 p^{-2/3}(1+\sqrt q)(1+q^{-1/2})^{1/3}`, ``p = n/q``.

        >>> round(MarchenkoPasturFit.from_parameters(1.0).edge_scale(1000), 5)
        0.0252
        """
        n = _dimension(n, self.dimension)
        p = n / self.ratio
        root = np.sqrt(self.ratio)
        return float(self.variance * p ** (-2.0 / 3.0) * (1 + root) * (1 + 1 / root) ** (1 / 3))

    def spike_outlier(self, theta: float) -> float | None:
        """BBP position of a covariance spike ``theta`` (None below the threshold)."""
        return bbp_covariance(theta, self.ratio, self.variance)


@dataclass(frozen=True)
class SemicircleFit:
    r"""A fitted Wigner semicircle law on :math:`[c - r, c + r]` (see the module docstring).

    Attributes
    ----------
    radius, center:
        :math:`r` and :math:`c`.
    support:
        The edges :math:`(c - r, c + r)`.
    wasserstein, kolmogorov:
        Distances between the (kept) data and the fitted law.
    bulk_mass:
        Mass of the data kept in the bulk (1 minus the trimmed outliers).
    dimension:
        ``n`` when known (sets the edge scale).
    method:
        How the moments were obtained.

    Examples
    --------
    >>> fit = SemicircleFit.from_parameters(2.0)
    >>> fit.support
    (-2.0, 2.0)
    """

    radius: float
    center: float
    support: tuple[float, float]
    wasserstein: float = field(default=float("nan"))
    kolmogorov: float = field(default=float("nan"))
    bulk_mass: float = 1.0
    dimension: int | None = None
    method: str = "given"

    @classmethod
    def from_parameters(
        cls, radius: float, center: float = 0.0, dimension: int | None = None
    ) -> SemicircleFit:
        """The law with the given ``radius`` and ``center``.

        >>> SemicircleFit.from_parameters(2.0).support
        (-2.0, 2.0)
        """
        if not (np.isfinite(radius) and radius > 0):
            raise argument_error("radius", "a positive number", radius)
        if not np.isfinite(center):
            raise argument_error("center", "a finite number", center)
        support = (float(center - radius), float(center + radius))
        return cls(float(radius), float(center), support, dimension=dimension)

    def pdf(self, x: ArrayLike) -> FloatArray:
        r""":math:`\frac{2}{\pi r^2}\sqrt{r^2 - (x - c)^2}` on the support.

        >>> round(float(SemicircleFit.from_parameters(2.0).pdf(0.0)), 6)
        0.31831
        """
        u = (np.asarray(x, dtype=np.float64) - self.center) / self.radius
        # in units of r: no r^2, which overflows or underflows for radii beyond 1e+-154
        out: FloatArray = (2.0 / np.pi) / self.radius * np.sqrt(np.clip((1 - u) * (1 + u), 0, None))
        return out

    def cdf(self, x: ArrayLike, *, left: bool = False) -> FloatArray:
        r""":math:`\tfrac12 + (t\sqrt{1-t^2} + \arcsin t)/\pi`, :math:`t = (x - c)/r` clipped."""
        t = np.clip((np.asarray(x, dtype=np.float64) - self.center) / self.radius, -1.0, 1.0)
        out: FloatArray = 0.5 + (t * np.sqrt(1.0 - t * t) + np.arcsin(t)) / np.pi
        return out

    def quantile(self, s: ArrayLike) -> FloatArray:
        """Quantile function (by interpolation of a fine table of :meth:`cdf`)."""
        t = np.linspace(-1.0, 1.0, _TABLE)
        phi = np.sin(np.pi * t / 2.0)  # denser near the edges
        xs = self.center + self.radius * phi
        out: FloatArray = np.interp(np.asarray(s, dtype=np.float64), self.cdf(xs), xs)
        return out

    def edge_scale(self, n: int | None = None) -> float:
        r"""Tracy–Widom scale :math:`\tfrac r2\,n^{-2/3}` of the edges.

        >>> SemicircleFit.from_parameters(2.0).edge_scale(1000)
        0.01
        """
        n = _dimension(n, self.dimension)
        return float(self.radius / 2.0 * n ** (-2.0 / 3.0))

    def spike_outlier(self, theta: float) -> float | None:
        """BBP position of a rank-one perturbation ``theta`` (None below the threshold)."""
        return bbp_wigner(theta, self.radius / 2.0, self.center)


def _dimension(n: int | None, default: int | None) -> int:
    n = default if n is None else n
    if n is None or isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise argument_error("n", "a positive integer (the matrix size)", n)
    return int(n)


def probe_margin(fit: MarchenkoPasturFit | SemicircleFit, n: int, num_probes: int) -> float:
    r"""Probe fluctuation :math:`3(b - a)\sqrt{2/(nP)}` of the edges of a fit to an SLQ density.

    Parameters
    ----------
    fit : MarchenkoPasturFit or SemicircleFit
        The fitted bulk :math:`[a, b]`.
    n : int
        Dimension.
    num_probes : int
        Number :math:`P` of SLQ probes.

    Returns
    -------
    float
        The margin (absolute).

    Examples
    --------
    >>> probe_margin(SemicircleFit.from_parameters(2.0), 800, 1)
    0.6
    """
    n = check_integer("n", n, "a positive integer (the matrix size)", lambda k: k >= 1)
    num_probes = check_integer("num_probes", num_probes, "a positive integer", lambda k: k >= 1)
    lo, hi = fit.support
    return float(3.0 * (hi - lo) * np.sqrt(2.0 / (n * num_probes)))


def _fit(data: Any, make: Any, num_scales: float, trim: bool, name: str) -> Any:
    x, w, n, how = _data(data)
    if not (np.isfinite(num_scales) and num_scales >= 0):
        raise argument_error("num_scales", "a non-negative number", num_scales)
    probes = data.num_probes if isinstance(data, SpectralDensity) else None
    keep = np.ones(x.size, dtype=bool)
    fit = make(*_moments(x, w), n)
    slack = math.inf
    for _ in range(_MAX_ROUNDS if trim and n is not None else 0):
        lo, hi = fit.support
        slack = num_scales * fit.edge_scale(n)
        if probes is not None and n is not None:
            slack += probe_margin(fit, n, probes)
        out = x > hi + slack
        if isinstance(fit, SemicircleFit) or probes is None:
            # Ritz nodes may sit in the gap between an atom at 0 and a Marchenko-Pastur bulk
            out |= x < lo - slack
        if isinstance(fit, MarchenkoPasturFit) and fit.atom > 0:
            out &= np.abs(x) > slack  # the atom at zero is part of the bulk
        new = keep & ~out
        if not new.any() or np.array_equal(new, keep):
            break
        keep = new
        try:
            fit = make(*_moments(x[keep], w[keep]), n)
        except ValueError as exc:  # the error would describe the trimmed points as the input
            raise argument_error(
                "trim",
                f"a bulk left to fit after trimming {int((~keep).sum())} of {x.size} points "
                f"beyond {num_scales:g} edge scales as outliers (pass trim=False or a larger "
                "num_scales)",
                f"True, whose trimmed bulk cannot be fitted: {exc}",
            ) from exc
    if isinstance(fit, MarchenkoPasturFit) and fit.atom > 0:
        # pool the atom: eigenvalues within min(slack, a/2) of 0 are zeros up to rounding
        x = np.where(np.abs(x) <= min(slack, fit.support[0] / 2.0), 0.0, x)
    w1, ks = _distances(x[keep], w[keep], fit)
    return type(fit)(
        *(getattr(fit, f) for f in fit.__dataclass_fields__ if f not in _EXTRA),
        wasserstein=w1,
        kolmogorov=ks,
        bulk_mass=float(w[keep].sum() / w.sum()),
        dimension=n,
        method=f"{how}, {name}" + (f", trimmed beyond {num_scales:g} edge scales" if trim else ""),
    )


_EXTRA = ("wasserstein", "kolmogorov", "bulk_mass", "dimension", "method")


def fit_marchenko_pastur(
    density_or_eigenvalues: SpectralDensity | ArrayLike,
    *,
    num_scales: float = 4.0,
    trim: bool = True,
) -> MarchenkoPasturFit:
    r"""Fit a Marchenko–Pastur law by moments: :math:`\sigma^2 = m_1`, :math:`q = s^2/m_1^2`.

    Parameters
    ----------
    density_or_eigenvalues:
        Exact eigenvalues (1-D array) or a :class:`~spectral.SpectralDensity` (e.g. from
        :func:`spectral.slq`; its Gauss-quadrature moments :math:`m_1, m_2` are exact
        per probe for ``m >= 2`` Lanczos steps).
    num_scales:
        Points beyond the fitted edges by more than this many Tracy–Widom edge scales
        (:meth:`MarchenkoPasturFit.edge_scale`, needs the dimension ``n``) are trimmed as
        outliers and the fit repeated.
    trim:
        ``False`` fits all the data as they are.

    Returns
    -------
    MarchenkoPasturFit
        The fitted law with its distances to the data and the mass kept in the bulk.

    Raises
    ------
    ValueError
        Fewer than two eigenvalues, non-finite values, or moments that no
        Marchenko–Pastur law has (:math:`m_1 \le 0` or :math:`m_2 \le m_1^2`).

    Examples
    --------
    >>> from spectral import synthetic
    >>> fit = fit_marchenko_pastur(synthetic.wishart_operator(500, 2000, seed=1).eigenvalues())
    >>> bool(abs(fit.ratio - 0.25) < 0.02), bool(fit.kolmogorov < 0.03)
    (True, True)
    """

    def make(mean: float, std: float, n: int | None) -> MarchenkoPasturFit:
        ratio = (std / mean) ** 2 if mean > 0 else math.nan  # q = (m2 - m1^2) / m1^2
        if not (math.isfinite(ratio) and ratio > 0):
            raise argument_error(
                "density_or_eigenvalues",
                "a spectrum with positive mean and variance (a Marchenko-Pastur bulk)",
                density_or_eigenvalues,
            )
        return MarchenkoPasturFit.from_parameters(ratio, mean, n)

    out: MarchenkoPasturFit = _fit(density_or_eigenvalues, make, num_scales, trim, "moments")
    return out


def fit_semicircle(
    density_or_eigenvalues: SpectralDensity | ArrayLike,
    *,
    num_scales: float = 4.0,
    trim: bool = True,
) -> SemicircleFit:
    r"""Fit a semicircle by moments: :math:`c = m_1`, :math:`r = 2s`, :math:`s^2 = m_2 - m_1^2`.

    Same arguments as :func:`fit_marchenko_pastur` (edge scale
    :meth:`SemicircleFit.edge_scale`).

    Parameters
    ----------
    density_or_eigenvalues : SpectralDensity or array_like
        Exact eigenvalues or an SLQ density.
    num_scales : float
        Trimming threshold in edge scales.
    trim : bool
        ``False`` fits all the data as they are.

    Returns
    -------
    SemicircleFit
        The fitted law with its distances to the data and the mass kept in the bulk.

    Examples
    --------
    >>> from spectral import synthetic
    >>> fit = fit_semicircle(np.linalg.eigvalsh(synthetic.wigner(300, seed=0, radius=3.0)))
    >>> bool(abs(fit.radius - 3.0) < 0.05), bool(abs(fit.center) < 0.05)
    (True, True)
    """

    def make(mean: float, std: float, n: int | None) -> SemicircleFit:
        if not std > 0:
            raise argument_error(
                "density_or_eigenvalues",
                "a spectrum with positive variance",
                f"a spectrum with standard deviation {std!r}",
            )
        return SemicircleFit.from_parameters(2.0 * std, mean, n)

    out: SemicircleFit = _fit(density_or_eigenvalues, make, num_scales, trim, "moments")
    return out


@dataclass(frozen=True)
class Outliers:
    """Eigenvalues beyond the fitted bulk (see :func:`outliers`).

    Attributes
    ----------
    values:
        The outlying eigenvalues, ascending.
    indices:
        Their positions in the array passed to :func:`outliers`.
    scales:
        Their distance beyond the nearest edge, in edge (Tracy–Widom) scales.
    residuals:
        The residual norms passed for them (e.g. Ritz residuals), or ``None``.
    edges:
        The bulk edges :math:`(a, b)` used; ``scale`` the edge scale.

    Examples
    --------
    >>> out = outliers([0.5, 3.0], SemicircleFit.from_parameters(2.0), n=1000)
    >>> len(out), out.values.tolist()
    (1, [3.0])
    """

    values: FloatArray
    indices: NDArray[np.int64]
    scales: FloatArray
    residuals: FloatArray | None
    edges: tuple[float, float]
    scale: float

    def __len__(self) -> int:
        return int(self.values.size)


def outliers(
    eigenvalues: ArrayLike,
    fit: MarchenkoPasturFit | SemicircleFit,
    *,
    num_scales: float = 4.0,
    n: int | None = None,
    residuals: ArrayLike | None = None,
    lower: bool = True,
    margin: float = 0.0,
) -> Outliers:
    r"""Eigenvalues beyond the fitted bulk edges by more than ``num_scales`` edge scales.

    An eigenvalue :math:`\lambda` is an outlier when :math:`\lambda > b + k s` (or, with
    ``lower``, :math:`\lambda < a - k s`), with :math:`[a, b]` = ``fit.support``,
    :math:`k` = ``num_scales`` and :math:`s` = ``fit.edge_scale(n)``, the Tracy–Widom scale
    :math:`\propto n^{-2/3}` of the extreme bulk eigenvalues. For a Marchenko–Pastur fit
    with an atom at zero, eigenvalues within :math:`ks` of 0 are bulk.

    ``margin`` (absolute, >= 0) is added to :math:`ks`: e.g. the probe fluctuation
    :math:`3(b - a)\sqrt{2/(nP)}` of edges fitted to an SLQ density.

    ``residuals`` (e.g. Ritz residual norms :math:`\|Ay - \theta y\|`, same length as
    ``eigenvalues``) are carried along. From a Lanczos run an outlier is trustworthy when
    its residual is well below its distance to the edge.

    Parameters
    ----------
    eigenvalues : array_like
        Eigenvalues or Ritz values.
    fit : MarchenkoPasturFit or SemicircleFit
        The fitted bulk.
    num_scales : float
        Threshold :math:`k` in edge scales.
    n : int, optional
        Dimension (default: the fit's).
    residuals : array_like, optional
        Residual norms carried along.
    lower : bool
        Also look below the lower edge.
    margin : float
        Absolute margin added to :math:`ks`.

    Returns
    -------
    Outliers
        The outlying values, their indices, scales and residuals.

    Examples
    --------
    >>> fit = SemicircleFit.from_parameters(2.0)
    >>> out = outliers([-1.0, 0.5, 1.99, 2.5, 4.25], fit, n=1000)
    >>> out.values.tolist(), out.indices.tolist()
    ([2.5, 4.25], [3, 4])
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1:
        raise argument_error(
            "eigenvalues",
            "a 1-D array of eigenvalues (not the matrix itself)",
            f"shape {lam.shape}",
        )
    if not np.all(np.isfinite(lam)):
        raise argument_error("eigenvalues", "finite values", eigenvalues)
    if not isinstance(fit, MarchenkoPasturFit | SemicircleFit):
        raise argument_error("fit", "a MarchenkoPasturFit or SemicircleFit", fit, kind=TypeError)
    if not (np.isfinite(num_scales) and num_scales >= 0):
        raise argument_error("num_scales", "a non-negative number", num_scales)
    res = None
    if residuals is not None:
        res = np.asarray(residuals, dtype=np.float64).reshape(-1)
        if res.shape != lam.shape:
            raise argument_error("residuals", f"an array of shape {lam.shape}", residuals)
    if not (np.isfinite(margin) and margin >= 0):
        raise argument_error("margin", "a non-negative number", margin)
    scale = fit.edge_scale(n)
    a, b = fit.support
    slack = num_scales * scale + float(margin)
    above = lam > b + slack
    below = (lam < a - slack) if lower else np.zeros(lam.size, dtype=bool)
    if isinstance(fit, MarchenkoPasturFit) and fit.atom > 0:
        below &= np.abs(lam) > slack
    idx = np.flatnonzero(above | below)
    idx = idx[np.argsort(lam[idx], kind="stable")]
    dist = np.where(lam[idx] > b, lam[idx] - b, a - lam[idx]) / scale
    return Outliers(
        values=lam[idx],
        indices=idx.astype(np.int64),
        scales=dist,
        residuals=None if res is None else res[idx],
        edges=(a, b),
        scale=scale,
    )


def bbp_covariance(theta: float, ratio: float, variance: float = 1.0) -> float | None:
    r"""BBP outlier :math:`\sigma^2(1 + \theta)(1 + q/\theta)` of a covariance spike ``theta``.

    For a population covariance :math:`\sigma^2(I + \theta uu^\top)` and ratio
    :math:`q = n/p`; ``None`` when :math:`|\theta| \le \sqrt q` (the spike stays at the edge).

    Parameters
    ----------
    theta : float
        The spike :math:`\theta > -1` (a population covariance eigenvalue
        :math:`1 + \theta`); a negative spike with :math:`\theta < -\sqrt q` gives an
        outlier below the bulk.
    ratio : float
        Aspect ratio :math:`q = n/p`.
    variance : float
        Noise variance :math:`\sigma^2`.

    Returns
    -------
    float or None
        The outlier's location, or ``None`` below the transition.

    Examples
    --------
    >>> bbp_covariance(4.0, 0.25), bbp_covariance(0.4, 0.25), round(bbp_covariance(-0.9, 0.25), 4)
    (5.3125, None, 0.0722)
    """
    if not (np.isfinite(ratio) and ratio > 0):
        raise argument_error("ratio", "a positive number", ratio)
    if not (np.isfinite(theta) and theta > -1.0):
        raise argument_error(
            "theta", "a finite spike > -1 (the population covariance 1 + theta > 0)", theta
        )
    check_real("variance", variance, "a positive finite number", lambda v: 0 < v < math.inf)
    if abs(theta) <= np.sqrt(ratio):
        return None
    return float(variance * (1.0 + theta) * (1.0 + ratio / theta))


def bbp_wigner(theta: float, scale: float = 1.0, center: float = 0.0) -> float | None:
    r"""BBP outlier :math:`c + \theta + s^2/\theta` of a Wigner matrix (radius ``2s``) plus
    :math:`\theta uu^\top`; ``None`` when :math:`|\theta| \le s`.

    Parameters
    ----------
    theta : float
        The spike :math:`\theta`; a negative one with :math:`\theta < -s` gives an outlier
        below the bulk.
    scale : float
        Scale :math:`s` (the bulk is :math:`[c - 2s, c + 2s]`).
    center : float
        Centre :math:`c` of the bulk.

    Returns
    -------
    float or None
        The outlier's location, or ``None`` below the transition.

    Examples
    --------
    >>> bbp_wigner(4.0), bbp_wigner(0.5), round(bbp_wigner(-3.0), 4)
    (4.25, None, -3.3333)
    """
    if not (np.isfinite(scale) and scale > 0):
        raise argument_error("scale", "a positive number", scale)
    if not np.isfinite(theta):
        raise argument_error("theta", "a finite number", theta)
    check_real("center", center, "a finite number")
    if abs(theta) <= scale:
        return None
    return float(center + theta + scale * scale / theta)

r"""Matplotlib views of spectral densities and Lanczos runs.

Every function takes an optional :class:`matplotlib.axes.Axes` and returns the Axes it drew
on; without one it creates a new :class:`matplotlib.figure.Figure` (no pyplot, no global
state, never ``show()``). Save with ``ax.figure.savefig(...)``. Matplotlib is imported only
when a function is called.

* :func:`plot_ritz_stem`: stems at the Ritz values :math:`\theta_i` of height :math:`w_i`
  (the discrete density sums to 1), optionally on a log weight axis where tiny outlier
  weights become visible;
* :func:`plot_smoothed_density`: :math:`\sum_i w_i K_\sigma(x - \theta_i)`;
* :func:`plot_overlay`: stems over a histogram of exact eigenvalues or of diagonal entries
  (bars as probability mass per bin, so both sides sum to 1, as in the paper's Figure 2);
* :func:`plot_ritz_convergence`: the Ritz values of :math:`T_k` for every ``k``, the classic
  picture of extreme eigenvalues converging first;
* :func:`plot_cdf_band`: the spectral distribution function with its confidence band
  shaded and the certified quadrature bounds drawn (:meth:`SpectralDensity.cdf_band`,
  :meth:`SpectralDensity.cdf_bounds`), the title stating ``m``, ``P`` and the confidence;
* :func:`plot_bulk_fit`: a smoothed density with a fitted random-matrix law
  (:mod:`spectral.rmt`) over it, its edges and the outliers.

>>> from spectral.density import SpectralDensity, kernel_width
>>> ax = plot_ritz_stem(SpectralDensity([0.0, 1.0, 5.0], [0.5, 0.45, 0.05]), log_weights=True)
>>> ax.get_yscale()
'log'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from spectral.density import SpectralDensity, kernel_width
from spectral.errors import argument_error

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = [
    "describe_density",
    "plot_bulk_fit",
    "plot_cdf_band",
    "plot_overlay",
    "plot_ritz_convergence",
    "plot_ritz_stem",
    "plot_smoothed_density",
]


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    return Figure(figsize=(6.0, 4.0), layout="constrained").add_subplot()


def _density(density: Any) -> SpectralDensity:
    """Accept a :class:`SpectralDensity` or any object with ``nodes`` and ``weights`` arrays."""
    if isinstance(density, SpectralDensity):
        return density
    if hasattr(density, "nodes") and hasattr(density, "weights"):
        return SpectralDensity(density.nodes, density.weights)
    raise argument_error(
        "density", "a SpectralDensity (an object with nodes and weights)", density, kind=TypeError
    )


def plot_ritz_stem(
    density: SpectralDensity,
    ax: Axes | None = None,
    *,
    log_weights: bool = False,
    label: str | None = "Lanczos",
    color: str | None = None,
    markersize: float | None = None,
) -> Axes:
    r"""Stem plot of the (pooled) nodes :math:`\theta_i` against their weights :math:`w_i`.

    With ``log_weights=True`` the weight axis is logarithmic (zero weights are dropped).
    ``color`` and ``markersize`` style the stems and their heads.

    Parameters
    ----------
    density : SpectralDensity
        The density whose pooled nodes and weights are drawn.
    ax : matplotlib.axes.Axes, optional
        Where to draw (a new figure when ``None``).
    log_weights : bool
        Logarithmic weight axis.
    label : str or None
        Legend label.
    color : str, optional
        Colour of the stems.
    markersize : float, optional
        Size of the stem heads.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> from spectral.density import SpectralDensity
    >>> ax = plot_ritz_stem(SpectralDensity([1.0, 2.0], [0.5, 0.5]))
    >>> ax.get_ylabel()
    'weight'
    """
    d = _density(density)
    ax = _axes(ax)
    nodes, weights = d.nodes, d.weights
    if log_weights:
        keep = weights > 0
        nodes, weights = nodes[keep], weights[keep]
        bottom = float(weights.min()) / 2.0 if weights.size else 1e-16
    else:
        bottom = 0.0
    container = ax.stem(nodes, weights, bottom=bottom, label=label, basefmt=" ")
    if color is not None:
        container.markerline.set_color(color)
        container.stemlines.set_color(color)
    if markersize is not None:
        container.markerline.set_markersize(markersize)
    if log_weights:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("weight")
    return ax


def plot_smoothed_density(
    density: SpectralDensity,
    ax: Axes | None = None,
    *,
    grid: ArrayLike | None = None,
    sigma: float | None = None,
    kernel: str = "gaussian",
    label: str | None = None,
    num_points: int = 512,
    log_density: bool = False,
) -> Axes:
    r"""Plot the smoothed density :math:`\rho_\sigma(x) = \sum_i w_i K_\sigma(x - \theta_i)`.

    See :meth:`SpectralDensity.smooth`. Defaults: ``sigma`` is 1/100 of the node range (or
    1e-3 for a single node); ``grid`` spans the nodes ± 5 ``sigma`` with ``num_points`` points.

    Parameters
    ----------
    density : SpectralDensity
        The density.
    ax : matplotlib.axes.Axes, optional
        Where to draw (a new figure when ``None``).
    grid : array_like, optional
        Evaluation points.
    sigma : float, optional
        Kernel width.
    kernel : str
        ``"gaussian"`` or ``"lorentzian"``.
    label : str, optional
        Legend label.
    num_points : int
        Size of the default grid.
    log_density : bool
        Logarithmic density axis.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> from spectral.density import SpectralDensity
    >>> ax = plot_smoothed_density(SpectralDensity([1.0, 2.0], [0.5, 0.5]), sigma=0.1)
    >>> len(ax.get_lines())
    1
    """
    d = _density(density)
    ax = _axes(ax)
    lo, hi = float(d.nodes[0]), float(d.nodes[-1])
    if sigma is None:
        sigma = (hi - lo) / 100.0 if hi > lo else 1e-3 * max(1.0, abs(lo))
    sigma = kernel_width(sigma)  # before the grid is built from it (inf: numpy's warning)
    if grid is None:
        xs = np.linspace(lo - 5.0 * sigma, hi + 5.0 * sigma, _points(num_points))
    else:
        xs = np.asarray(grid, dtype=np.float64).reshape(-1)
        if xs.size == 0 or not np.all(np.isfinite(xs)):
            raise argument_error("grid", "a non-empty array of finite points", grid)
    values = d.smooth(xs, sigma, kernel)
    ax.plot(xs, values, label=label if label is not None else f"{kernel}, σ={sigma:.3g}")
    if log_density:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax


def _points(num_points: Any) -> int:
    """``num_points`` checked: an integer >= 2 (a curve needs two points)."""
    if (
        isinstance(num_points, bool)
        or not isinstance(num_points, int | np.integer)
        or num_points < 2
    ):
        raise argument_error("num_points", "an integer >= 2", num_points)
    return int(num_points)


def plot_overlay(
    density: SpectralDensity,
    values: ArrayLike,
    ax: Axes | None = None,
    *,
    label: str = "exact eigenvalues",
    bins: int | Sequence[float] = 50,
    log_weights: bool = False,
    stem_label: str = "Lanczos",
) -> Axes:
    """Stems of ``density`` over a histogram of ``values`` (exact eigenvalues or a diagonal).

    Histogram bars show the *mass* per bin (heights sum to 1), the same scale as the stems,
    so a diagonal histogram and a Lanczos density can be compared by eye.

    Parameters
    ----------
    density : SpectralDensity
        The Lanczos density (stems).
    values : array_like
        Exact eigenvalues or diagonal entries (histogram).
    ax : matplotlib.axes.Axes, optional
        Where to draw (a new figure when ``None``).
    label : str
        Legend label of the histogram.
    bins : int or sequence of float
        Histogram bins.
    log_weights : bool
        Logarithmic weight axis.
    stem_label : str
        Legend label of the stems.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> from spectral.density import SpectralDensity
    >>> d = SpectralDensity([-1.0, 1.0], [0.5, 0.5])
    >>> ax = plot_overlay(d, [0.0, 0.01, -0.01], label="diagonal", bins=5)
    >>> len(ax.patches)
    5
    """
    d = _density(density)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise argument_error("values", "a non-empty array of finite reals", values)
    ax = _axes(ax)
    ax.hist(v, bins=bins, weights=np.full(v.size, 1.0 / v.size), alpha=0.5, label=label)
    plot_ritz_stem(d, ax, log_weights=log_weights, label=stem_label)
    ax.legend()
    return ax


def plot_ritz_convergence(
    alpha: ArrayLike,
    beta: ArrayLike,
    ax: Axes | None = None,
    *,
    eigenvalues: ArrayLike | None = None,
    max_eigenvalue_lines: int = 200,
) -> Axes:
    r"""Ritz values of every leading block :math:`T_k` (``k = 1..m``) of a Lanczos run.

    ``alpha`` (length ``m``) and ``beta`` (length ``m - 1``) are the recurrence
    coefficients, e.g. ``LanczosResult.alpha`` and ``.beta``. Exact ``eigenvalues``, if
    given, are drawn as faint horizontal lines (at most ``max_eigenvalue_lines`` of them,
    evenly subsampled). By Cauchy interlacing the extreme Ritz values move monotonically
    outwards; interior ones need not converge.

    Parameters
    ----------
    alpha, beta : array_like
        The Lanczos coefficients (lengths ``m`` and ``m - 1``).
    ax : matplotlib.axes.Axes, optional
        Where to draw (a new figure when ``None``).
    eigenvalues : array_like, optional
        Exact eigenvalues drawn as horizontal lines.
    max_eigenvalue_lines : int
        At most this many eigenvalue lines.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> ax = plot_ritz_convergence([1.0, 2.0, 3.0], [0.5, 0.5])
    >>> ax.get_xlabel()
    'Lanczos iteration k'
    """
    import scipy.linalg

    a = np.asarray(alpha, dtype=np.float64).reshape(-1)
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    for name, arr, given in (("alpha", a, alpha), ("beta", b, beta)):
        if not np.all(np.isfinite(arr)):
            raise argument_error(name, "finite Lanczos coefficients", given)
    if a.size == 0 or b.size != a.size - 1:
        raise argument_error("beta", f"an array of length len(alpha) - 1 = {a.size - 1}", beta)
    ax = _axes(ax)
    if eigenvalues is not None:
        lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))
        if lam.size > max_eigenvalue_lines:
            lam = lam[np.linspace(0, lam.size - 1, max_eigenvalue_lines).round().astype(int)]
        for value in lam:
            ax.axhline(value, color="0.85", linewidth=0.6, zorder=0)
    ks: list[np.ndarray] = []
    thetas: list[np.ndarray] = []
    for k in range(1, a.size + 1):
        theta = (
            a[:1].copy()
            if k == 1
            else scipy.linalg.eigh_tridiagonal(a[:k], b[: k - 1], eigvals_only=True)
        )
        ks.append(np.full(k, k))
        thetas.append(theta)
    ax.scatter(np.concatenate(ks), np.concatenate(thetas), s=6, color="C0", label="Ritz values")
    ax.set_xlabel("Lanczos iteration k")
    ax.set_ylabel("Ritz value")
    return ax


def describe_density(density: SpectralDensity, confidence: float | None = None) -> str:
    """A one-line description: ``m`` (nodes per probe), ``P``, ``n`` and the confidence.

    Parameters
    ----------
    density : SpectralDensity
        The density.
    confidence : float, optional
        The band's confidence, stated when given.

    Returns
    -------
    str
        E.g. ``'m = 10, P = 2, n = 200, 95% band'``.

    Examples
    --------
    >>> from spectral.density import SpectralDensity
    >>> d = SpectralDensity.from_probes([[0.0, 1.0]], [[0.5, 0.5]], dimension=10)
    >>> describe_density(d, 0.95)
    'm = 2, P = 1, n = 10, 95% band'
    """
    d = _density(density)
    if d.probe_nodes is not None:
        m = int(np.max(np.sum(~np.isnan(d.probe_nodes), axis=1)))
    else:
        m = len(d)
    parts = [f"m = {m}", f"P = {d.num_probes}"]
    if d.dimension is not None:
        parts.append(f"n = {d.dimension}")
    if confidence is not None:
        parts.append(f"{100 * confidence:g}% band")
    return ", ".join(parts)


def plot_cdf_band(
    density: SpectralDensity,
    ax: Axes | None = None,
    *,
    confidence: float = 0.95,
    grid: ArrayLike | None = None,
    num_points: int = 512,
    exact: ArrayLike | None = None,
    probe_distribution: str | None = None,
    color: str = "C0",
    label: str | None = "SLQ",
) -> Axes:
    r"""The spectral distribution function: estimate, certified bounds and confidence band.

    Draws the pooled SLQ distribution function :math:`\sum_{\theta_i \le x} w_i`, shades the
    band :meth:`SpectralDensity.cdf_band` (pointwise, at ``confidence``), draws the
    quadrature bounds :meth:`SpectralDensity.cdf_bounds` of the probe average as dashed
    steps, and optionally the exact distribution function of ``exact`` eigenvalues. The
    title states ``m``, ``P``, ``n`` and the confidence. A density without probe
    distribution (explicit probes) draws the bounds only unless ``probe_distribution``
    is given.

    Parameters
    ----------
    density : SpectralDensity
        An SLQ density (with its per-probe rules).
    ax : matplotlib.axes.Axes, optional
        Where to draw (a new figure when ``None``).
    confidence : float
        Confidence of the shaded band.
    grid : array_like, optional
        Where to evaluate (default: ``num_points`` points over the nodes).
    num_points : int
        Size of the default grid.
    exact : array_like, optional
        Exact eigenvalues, whose distribution function is drawn too.
    probe_distribution : str, optional
        The distribution explicit probes were drawn from.
    color : str
        Colour of the estimate and its band.
    label : str or None
        Legend label of the estimate.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> import numpy as np
    >>> from spectral import slq
    >>> d = slq(np.diag(np.linspace(0.0, 1.0, 200)), 10, num_probes=2, seed=0)
    >>> ax = plot_cdf_band(d)
    >>> ax.get_title()
    'm = 10, P = 2, n = 200, 95% band'
    """
    d = _density(density)
    ax = _axes(ax)
    lo, hi = float(d.nodes[0]), float(d.nodes[-1])
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    if grid is None:
        xs = np.linspace(lo - pad, hi + pad, int(num_points))
    else:
        xs = np.sort(np.asarray(grid, dtype=np.float64).reshape(-1))
    kind = probe_distribution if probe_distribution is not None else d.probe_kind
    banded = d.source == "quadrature" and kind not in (None, "explicit")
    if banded:
        band_lo, band_hi = d.cdf_band(xs, confidence, probe_distribution=probe_distribution)
        ax.fill_between(
            xs,
            band_lo,
            band_hi,
            step="post",
            alpha=0.25,
            color=color,
            label=f"{100 * confidence:g}% band",
        )
    if d.source is not None:
        q_lo, q_hi = d.cdf_bounds(xs)
        ax.step(
            xs,
            q_lo,
            where="post",
            color=color,
            linestyle="--",
            linewidth=0.8,
            label="quadrature bounds",
        )
        ax.step(xs, q_hi, where="post", color=color, linestyle="--", linewidth=0.8)
    ax.step(xs, d.cdf(xs), where="post", color=color, label=label)
    if exact is not None:
        lam = np.sort(np.asarray(exact, dtype=np.float64).reshape(-1))
        if lam.size == 0 or not np.all(np.isfinite(lam)):
            raise argument_error("exact", "a non-empty array of finite eigenvalues", exact)
        truth = np.searchsorted(lam, xs, side="right") / lam.size
        ax.step(xs, truth, where="post", color="k", linewidth=0.8, label="exact")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral distribution function")
    ax.set_title(describe_density(d, confidence if banded else None))
    ax.legend(loc="lower right")
    return ax


def plot_bulk_fit(
    density: SpectralDensity,
    fit: Any,
    ax: Axes | None = None,
    *,
    outliers: ArrayLike | None = None,
    sigma: float | None = None,
    num_points: int = 512,
    log_density: bool = False,
) -> Axes:
    r"""A smoothed density with a fitted bulk law (:mod:`spectral.rmt`) and the outliers.

    ``fit`` is a :class:`spectral.rmt.MarchenkoPasturFit` or
    :class:`spectral.rmt.SemicircleFit` (anything with ``pdf``, ``support`` and
    ``wasserstein``); its edges are dotted lines, ``outliers`` (values, or an
    :class:`spectral.rmt.Outliers`) red ticks. The legend gives the fit's W₁ distance.

    Parameters
    ----------
    density : SpectralDensity
        The density to draw, smoothed.
    fit : MarchenkoPasturFit or SemicircleFit
        The fitted law.
    ax : matplotlib.axes.Axes, optional
        Where to draw (a new figure when ``None``).
    outliers : array_like or Outliers, optional
        Outlying eigenvalues to mark.
    sigma : float, optional
        Smoothing width (default: from the node range).
    num_points : int
        Grid points of the curves.
    log_density : bool
        Logarithmic density axis.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> import numpy as np
    >>> from spectral import rmt
    >>> from spectral.density import SpectralDensity
    >>> lam = np.linspace(-2.0, 2.0, 101)
    >>> ax = plot_bulk_fit(SpectralDensity.from_eigenvalues(lam), rmt.fit_semicircle(lam))
    >>> len(ax.get_lines()) >= 3
    True
    """
    from spectral.rmt import MarchenkoPasturFit, SemicircleFit

    if not isinstance(fit, MarchenkoPasturFit | SemicircleFit):
        raise argument_error("fit", "a MarchenkoPasturFit or SemicircleFit", fit, kind=TypeError)
    d = _density(density)
    ax = _axes(ax)
    a, b = (float(v) for v in fit.support)
    lo = min(float(d.nodes[0]), a)
    hi = max(float(d.nodes[-1]), b)
    if sigma is None:
        sigma = (b - a) / 50.0 if b > a else 1e-3
    xs = np.linspace(lo - 5 * sigma, hi + 5 * sigma, _points(num_points))
    ax.plot(xs, d.smooth(xs, sigma), label=f"density, σ={sigma:.3g}")
    name = type(fit).__name__.replace("Fit", "")
    w1 = getattr(fit, "wasserstein", float("nan"))
    atom = float(getattr(fit, "atom", 0.0) or 0.0)
    # an atom at 0 (rank-deficient Wishart) has no density to draw: say so
    extra = f"; atom of mass {atom:.3g} at 0 not drawn" if atom > 0 else ""
    ax.plot(xs, fit.pdf(xs), color="C1", label=f"{name} fit (W₁ = {w1:.3g}{extra})")
    for edge in (a, b):
        ax.axvline(edge, color="C1", linestyle=":", linewidth=0.8)
    if outliers is not None:
        values = getattr(outliers, "values", outliers)
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        for k, value in enumerate(v):
            ax.axvline(value, color="C3", linewidth=1.0, label="outliers" if k == 0 else None)
    if log_density:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(describe_density(d))
    ax.legend()
    return ax

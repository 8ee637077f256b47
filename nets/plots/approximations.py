r"""Every proxy's spectrum over the exact one, in one unit (issue 21's comparison figure).

The paper's Figure 2 draws Lanczos stems (weights summing to one) against a histogram
of the diagonal (area one): two units on one axis.  Here every spectrum is a
probability measure on the eigenvalues, the exact operator's from SLQ or its
eigenvalues, each proxy's from its own structure (K-FAC's factor eigenvalues, a
diagonal's entries, ...), and all are drawn the same way:

* ``kind="cdf"`` (default): the cumulative distribution :math:`F(x) = \mu((-\infty, x])`
  (unit: fraction of eigenvalues; what the :math:`W_1` distance of
  :func:`curvops.compare` integrates the gap of);
* ``kind="density"``: Gaussian-smoothed densities :math:`\sum_i w_i K_\sigma(x -
  \theta_i)` with one :math:`\sigma` for all (unit: 1 / eigenvalue; each curve has
  area one).

>>> import numpy as np
>>> from curvops import Diagonal, Dense, compare_all
>>> A = Dense(np.diag([3.0, 1.0, 0.5, 0.2]), symmetric=True)
>>> reports = compare_all({"diag": Diagonal(np.array([1.0, 1.0, 1.0, 1.9]))}, A, k=1)
>>> fig = plot_approximations(reports)
>>> fig.axes[0].get_ylabel()
'cumulative fraction of eigenvalues'
>>> close_figure(fig)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nets.plots._figure import PALETTE, close_figure, figure_style, new_figure, save_figure
from spectral import SpectralDensity
from spectral.errors import argument_error

__all__ = ["close_figure", "plot_approximations"]

_LABELS = {
    "cdf": "cumulative fraction of eigenvalues",
    "density": "spectral density (1 / eigenvalue)",
}


def _measure(report: Any, side: str) -> SpectralDensity:
    try:
        nodes = np.asarray(getattr(report, f"spectrum_nodes_{side}"), dtype=np.float64)
        weights = np.asarray(getattr(report, f"spectrum_weights_{side}"), dtype=np.float64)
    except AttributeError as err:
        raise argument_error(
            "reports", "curvops.ApproximationReport values", type(report), kind=TypeError
        ) from err
    return SpectralDensity(nodes, weights)


def plot_approximations(
    reports: Mapping[str, Any],
    *,
    exact_label: str = "exact",
    kind: str = "cdf",
    sigma: float | None = None,
    num_points: int = 600,
    ax: Axes | None = None,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Overlay each proxy's spectrum on the exact one (all CDFs, or all smoothed densities).

    Parameters
    ----------
    reports:
        ``{name: ApproximationReport}`` from :func:`curvops.compare_all` (one exact side).
    exact_label:
        Legend label of the exact spectrum (e.g. ``"Lanc-GGN"``).
    kind:
        ``"cdf"`` or ``"density"`` (see the module docstring).
    sigma:
        Gaussian width for ``kind="density"``; default 1/100 of the plotted range.
    num_points:
        Grid points along the eigenvalue axis.
    ax, save_path, title:
        Draw into ``ax``; write the figure atomically to ``save_path``; the title.

    Raises
    ------
    ValueError, TypeError
        An empty mapping, values that are not reports, unknown ``kind``, bad ``sigma``.
    """
    if not isinstance(reports, Mapping) or not reports:
        raise argument_error("reports", "a non-empty mapping name -> report", reports)
    if kind not in _LABELS:
        raise argument_error("kind", "'cdf' or 'density'", kind)
    if sigma is not None and not (np.isfinite(sigma) and sigma > 0):
        raise argument_error("sigma", "a positive number", sigma)
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 10:
        raise argument_error("num_points", "an integer >= 10", num_points)
    first = next(iter(reports.values()))
    curves = [(f"{exact_label} ({first.spectrum_exact})", _measure(first, "exact"))]
    for name, report in reports.items():
        curves.append(
            (f"{name} ({report.spectrum_approximation})", _measure(report, "approximation"))
        )
    low = min(float(m.nodes.min()) for _, m in curves)
    high = max(float(m.nodes.max()) for _, m in curves)
    span = high - low if high > low else 1.0
    width = sigma if sigma is not None else span / 100.0
    pad = 0.05 * span + (3 * width if kind == "density" else 0.0)
    grid = np.linspace(low - pad, high + pad, num_points)
    with figure_style():
        if ax is None:
            fig, ax = new_figure((5.6, 3.4))
        else:
            fig = ax.get_figure()  # type: ignore[assignment]
        for i, (label, measure) in enumerate(curves):
            color, lw = PALETTE[i % len(PALETTE)], 2.0 if i == 0 else 1.3
            if kind == "cdf":
                ax.step(grid, measure.cdf(grid), where="post", label=label, color=color, lw=lw)
            else:
                ax.plot(grid, measure.smooth(grid, width), label=label, color=color, lw=lw)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel(_LABELS[kind])
        if kind == "cdf":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="lower right" if kind == "cdf" else "upper right")
        if title:
            ax.set_title(title)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig

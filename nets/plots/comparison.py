"""Lanczos spectra against a histogram of the diagonal, as in the paper's Figure 2.

The Lanczos Hessian (Lanc-Hess) and Lanczos GGN (Lanc-GGN) spectra are discrete
measures drawn as stems whose heights (weights) sum to one; the diagonal of the
GGN (Diag-GGN, exact or Monte-Carlo) is drawn as a density histogram whose
*area* is one. The diagonal entries are what a diagonal approximation would use
as eigenvalues, so the figure shows how poorly that approximation reproduces
the bulk and the outliers of the spectrum.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> fig = plot_spectrum_comparison((np.array([-0.1, 0.2, 4.0]), np.array([0.3, 0.6, 0.1])),
...                                (np.array([0.0, 0.3, 3.5]), np.array([0.5, 0.4, 0.1])),
...                                rng.exponential(0.5, size=200))
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
from nets.plots._sources import as_diagonal, as_spectrum
from nets.plots.spectrum import stem_spectrum
from spectral.errors import argument_error

__all__ = ["close_figure", "plot_spectrum_comparison"]


def _diagonals(source: Any) -> dict[str, np.ndarray]:
    """``{label: entries}``: one unlabelled diagonal, or several given as a mapping."""
    if isinstance(source, Mapping) and not any(
        k in source for k in ("diagonal", "diag", "ggn_diagonal")
    ):
        if not source:
            raise argument_error("ggn_diagonal", "a non-empty mapping of diagonals", source)
        return {
            f"Diag-GGN {label}": as_diagonal(value, name="ggn_diagonal")
            for label, value in source.items()
        }
    if isinstance(source, Mapping):
        key = next(k for k in ("diagonal", "diag", "ggn_diagonal") if k in source)
        return {"Diag-GGN": as_diagonal(source[key], name="ggn_diagonal")}
    return {"Diag-GGN": as_diagonal(source, name="ggn_diagonal")}


def plot_spectrum_comparison(
    hessian_spectrum: Any,
    ggn_spectrum: Any,
    ggn_diagonal: Any,
    *,
    bins: int | None = None,
    log_scale: bool = True,
    ax: Axes | None = None,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Draw Lanc-Hess and Lanc-GGN stems against a Diag-GGN histogram (the paper's Figure 2).

    Parameters
    ----------
    hessian_spectrum, ggn_spectrum:
        Spectra as accepted by :func:`nets.plot_spectrum` (``.npz`` path, mapping with
        ``w``/``gammas``, ``SpectralDensity``, ``(values, weights)``); either may be ``None``.
    ggn_diagonal:
        The GGN diagonal (array, tensor, or ``.npz`` with a ``diagonal`` key), or a mapping
        ``{"exact": d1, "MC": d2}`` to overlay several diagonals.
    bins:
        Histogram bins (default: about sqrt of the number of entries, between 20 and 80).
    log_scale:
        Logarithmic vertical axis (default): the histogram's density near zero and the
        weight of an outlier Ritz value (about 1/P) differ by many orders of magnitude.
    ax:
        Draw into this Axes instead of a new figure.
    save_path:
        Write the figure there (PNG/PDF by suffix) atomically.

    Returns
    -------
    matplotlib.figure.Figure
    """
    spectra = [
        (as_spectrum(s, name=n), label, color, marker)
        for s, n, label, color, marker in (
            (hessian_spectrum, "hessian_spectrum", "Lanc-Hess", PALETTE[0], "o"),
            (ggn_spectrum, "ggn_spectrum", "Lanc-GGN", PALETTE[1], "D"),
        )
        if s is not None
    ]
    diagonals = _diagonals(ggn_diagonal)
    if bins is not None and (not isinstance(bins, int) or bins < 1):
        raise argument_error("bins", "a positive integer", bins)
    entries = np.concatenate([d[np.isfinite(d)] for d in diagonals.values()])
    if entries.size == 0:
        raise argument_error("ggn_diagonal", "at least one finite entry", ggn_diagonal)
    nbins = bins or int(np.clip(np.sqrt(entries.size), 20, 80))
    low, high = float(entries.min()), float(entries.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, nbins + 1)
    with figure_style():
        if ax is None:
            fig, ax = new_figure((5.6, 3.4))
        else:
            fig = ax.get_figure()  # type: ignore[assignment]
        hist_colors = (PALETTE[2], PALETTE[4], PALETTE[3], PALETTE[5])
        floors = []
        for i, (label, values) in enumerate(diagonals.items()):
            heights, _, _ = ax.hist(
                values[np.isfinite(values)],
                bins=edges.tolist(),
                density=True,
                log=log_scale,
                facecolor=(hist_colors[i % len(hist_colors)], 0.35) if i == 0 else "none",
                histtype="stepfilled" if i == 0 else "step",
                linewidth=0.9,
                edgecolor=hist_colors[i % len(hist_colors)],
                label=f"{label} (histogram, area = 1)",
            )
            positive = np.asarray(heights)[np.asarray(heights) > 0]
            if positive.size:
                floors.append(float(positive.min()))
        for s, _, _, _ in spectra:
            positive = s.weights[s.weights > 0]
            if positive.size:
                floors.append(float(positive.min()))
        bottom = None
        if log_scale:
            smallest = min(floors) if floors else 1e-6
            bottom = max(smallest, 1e-300) / 2.0
        for s, label, color, marker in spectra:
            stem_spectrum(
                ax,
                s,
                log_weights=log_scale,
                color=color,
                marker=marker,
                label=f"{label} (stems, weights sum to 1)",
                bottom=bottom,
            )
        if log_scale and bottom is not None:
            ax.set_ylim(bottom=bottom)
        else:
            ax.set_ylim(bottom=0.0)
        ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
        ax.set_xlabel(r"eigenvalue $\lambda$ / diagonal entry")
        ax.set_ylabel("weight (stems) / density (histogram)")
        ax.set_title(title if title is not None else "Lanczos spectra vs diagonal GGN")
        ax.legend(loc="upper right")
    if save_path is not None:
        save_figure(fig, save_path)
    return fig

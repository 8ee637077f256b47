"""Lanczos spectra against a histogram of the diagonal, as in the paper's Figure 2.

The Lanczos Hessian (Lanc-Hess) and Lanczos GGN (Lanc-GGN) spectra are discrete
measures drawn as stems whose heights (weights) sum to one, in the upper panel;
the diagonal of the GGN (Diag-GGN exact, Diag-GGN MC) is drawn as a density
histogram whose *area* is one, in the lower panel. The two quantities have
different units (a weight, a density), so they never share a vertical axis; the
panels share the eigenvalue axis. The diagonal entries are what a diagonal
approximation would use as eigenvalues, so the figure shows how poorly that
approximation reproduces the bulk and the outliers of the spectrum. Legends
carry each run's m; the title the model and checkpoint when the files say.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> fig = plot_spectrum_comparison((np.array([-0.1, 0.2, 4.0]), np.array([0.3, 0.6, 0.1])),
...                                (np.array([0.0, 0.3, 3.5]), np.array([0.5, 0.4, 0.1])),
...                                rng.exponential(0.5, size=200))
>>> [ax.get_ylabel() for ax in fig.axes]
['weight (stems, sum to 1)', 'density (histogram, area = 1)']
>>> close_figure(fig)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nets.plots._figure import PALETTE, close_figure, figure_style, new_subplots, save_figure
from nets.plots._sources import Spectrum, as_array, as_diagonal, as_spectrum, resolve_file
from nets.plots.spectrum import source_label, stem_spectrum
from spectral.errors import argument_error
from spectral.io import load_npz

__all__ = ["close_figure", "plot_spectrum_comparison"]


DIAGONAL_LABELS = {"mc": "MC", "exact": "exact"}


def _diagonal_file(path: Any) -> dict[str, np.ndarray]:
    """``{label: entries}`` of a diagonal ``.npz``: ``diagonal`` (MC when the file says so)
    and ``diagonal_exact``."""
    arrays = load_npz(resolve_file(path, name="ggn_diagonal"))
    if "diagonal" not in arrays:
        return {"Diag-GGN": as_diagonal(path, name="ggn_diagonal")}
    config: dict[str, Any] = {}
    if "config_json" in arrays:
        config = json.loads(str(arrays["config_json"]))
    method = str(config.get("method", "mc" if "mc_samples" in arrays else "")).lower()
    label = DIAGONAL_LABELS.get(method)
    samples = int(config.get("mc_samples", arrays.get("mc_samples", 1)))
    if label == "MC" and samples > 1:
        label = f"MC x{samples}"
    out = {"Diag-GGN" if label is None else f"Diag-GGN {label}": as_array(arrays["diagonal"])}
    if "diagonal_exact" in arrays:
        out["Diag-GGN exact"] = as_array(arrays["diagonal_exact"])
    return {key: value.ravel() for key, value in out.items()}


def _diagonals(source: Any) -> dict[str, np.ndarray]:
    """``{label: entries}``: one unlabelled diagonal, a diagonal file, or a labelled mapping;
    every entry finite (dropping the others would draw a histogram of what is left under
    a legend that counts them all, as the spectra refuse non-finite values too)."""
    diagonals = _labelled_diagonals(source)
    for label, values in diagonals.items():
        bad = ~np.isfinite(values)
        if bad.any():
            raise argument_error(
                "ggn_diagonal",
                "finite diagonal entries",
                f"{label} with {int(bad.sum()):,} non-finite of {bad.size:,} entries, the first "
                f"at index {int(np.argmax(bad))} ({float(values[np.argmax(bad)])})",
            )
    return diagonals


def _labelled_diagonals(source: Any) -> dict[str, np.ndarray]:
    if isinstance(source, str | os.PathLike):
        return _diagonal_file(source)
    if isinstance(source, Mapping) and not any(
        k in source for k in ("diagonal", "diag", "ggn_diagonal")
    ):
        if not source:
            raise argument_error("ggn_diagonal", "a non-empty mapping of diagonals", source)
        return {
            f"Diag-GGN {DIAGONAL_LABELS.get(str(label).lower(), label)}": as_diagonal(
                value, name="ggn_diagonal"
            )
            for label, value in source.items()
        }
    if isinstance(source, Mapping):
        key = next(k for k in ("diagonal", "diag", "ggn_diagonal") if k in source)
        return {"Diag-GGN": as_diagonal(source[key], name="ggn_diagonal")}
    return {"Diag-GGN": as_diagonal(source, name="ggn_diagonal")}


def _m(s: Spectrum) -> int:
    return int(s.values.size if s.lanczos_iters is None else s.lanczos_iters)


def plot_spectrum_comparison(
    hessian_spectrum: Any,
    ggn_spectrum: Any,
    ggn_diagonal: Any,
    *,
    bins: int | None = None,
    log_scale: bool = True,
    axes: Sequence[Axes] | None = None,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Draw Lanc-Hess and Lanc-GGN stems over a Diag-GGN histogram (the paper's Figure 2).

    Parameters
    ----------
    hessian_spectrum, ggn_spectrum:
        Spectra as accepted by :func:`nets.plot_spectrum` (``.npz`` path, mapping with
        ``w``/``gammas``, ``SpectralDensity``, ``(values, weights)``); either may be ``None``.
    ggn_diagonal:
        The GGN diagonal (array, tensor, or an ``.npz`` with a ``diagonal`` key, whose
        ``config_json``/``mc_samples`` say whether it is the Monte-Carlo one, plus
        ``diagonal_exact`` if present), or a mapping ``{"exact": d1, "MC": d2}``.
    bins:
        Histogram bins (default: about sqrt of the number of entries, between 20 and 80).
    log_scale:
        Logarithmic vertical axes (default): an outlier Ritz value's weight (about 1/P)
        is far below the bulk's, and so is the histogram's density at large entries.
    axes:
        Two Axes to draw into, ``(stems, histogram)`` (e.g. a column of a larger figure);
        the title then goes on the upper one. Default: a new figure with two panels.
    save_path:
        Write the figure there (PNG/PDF by suffix) atomically.
    title:
        The figure's title (default: names the curvatures, each run's m and, when the
        spectrum files record them, the model and checkpoint).

    Returns
    -------
    matplotlib.figure.Figure
        Two panels sharing the eigenvalue axis: stems (weights) above, histogram
        (density) below.

    Raises
    ------
    ValueError
        A diagonal with a non-finite entry (naming the diagonal, how many and the first
        index), like a spectrum with a non-finite Ritz value or weight.

    Examples
    --------
    >>> import numpy as np
    >>> from spectral import SpectralDensity
    >>> hessian = SpectralDensity([-0.5, 1.0, 4.0], [0.2, 0.7, 0.1])
    >>> ggn = SpectralDensity([0.0, 1.0, 4.0], [0.5, 0.4, 0.1])
    >>> fig = plot_spectrum_comparison(hessian, ggn, np.linspace(0.0, 1.0, 50))
    >>> type(fig).__name__
    'Figure'
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
    edges = _histogram_edges(diagonals, bins)
    if axes is not None and len(axes) != 2:
        raise argument_error("axes", "two Axes (stems, histogram)", axes)
    with figure_style():
        if axes is None:
            fig, grid = new_subplots(2, 1, (5.6, 5.4), sharex=True)
            stem_ax, hist_ax = grid[0, 0], grid[1, 0]
        else:
            stem_ax, hist_ax = axes
            fig = stem_ax.get_figure()  # type: ignore[assignment]
        _draw_stems(stem_ax, spectra, log_scale)
        _draw_histograms(hist_ax, diagonals, edges, log_scale)
        for ax in (stem_ax, hist_ax):
            ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right")
        if title is None:
            title = _comparison_title(spectra)
        if axes is None:
            fig.suptitle(title, fontsize=10)
        else:
            stem_ax.set_title(title, fontsize=10)
            if not stem_ax.get_shared_x_axes().joined(stem_ax, hist_ax):  # one eigenvalue range
                limits = [*stem_ax.get_xlim(), *hist_ax.get_xlim()]
                for panel in (stem_ax, hist_ax):
                    panel.set_xlim(min(limits), max(limits))
    if save_path is not None:
        save_figure(fig, save_path)
    return fig


_Stems = list[tuple[Spectrum, str, str, str]]  # (spectrum, label, colour, marker)


def _histogram_edges(diagonals: dict[str, np.ndarray], bins: Any) -> np.ndarray:
    """Common bin edges over every diagonal entry (``bins`` or ``sqrt(n)`` in [20, 80])."""
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 1):
        raise argument_error("bins", "a positive integer", bins)
    entries = np.concatenate(list(diagonals.values()))
    nbins = bins or int(np.clip(np.sqrt(entries.size), 20, 80))
    low, high = float(entries.min()), float(entries.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, nbins + 1)


def _draw_stems(stem_ax: Axes, spectra: _Stems, log_scale: bool) -> None:
    """The Lanczos spectra as stems (weights sum to one) in the upper panel."""
    for s, label, color, marker in spectra:
        stem_spectrum(
            stem_ax,
            s,
            log_weights=log_scale,
            color=color,
            marker=marker,
            label=f"{label} (m = {_m(s)})",
        )
    if spectra and log_scale:
        positive = np.concatenate([s.weights[s.weights > 0] for s, *_ in spectra])
        if positive.size:
            stem_ax.set_ylim(bottom=float(positive.min()) / 2.0, top=1.5)
    elif spectra:
        stem_ax.set_ylim(bottom=0.0, top=1.05)
    stem_ax.set_ylabel("weight (stems, sum to 1)")
    stem_ax.set_xlabel("")  # the panels share the eigenvalue axis, labelled below


def _draw_histograms(
    hist_ax: Axes, diagonals: dict[str, np.ndarray], edges: np.ndarray, log_scale: bool
) -> None:
    """The diagonals as density histograms (area one) on common ``edges``, first one filled."""
    hist_colors = (PALETTE[2], PALETTE[4], PALETTE[3], PALETTE[5])
    for i, (label, values) in enumerate(diagonals.items()):
        hist_ax.hist(
            values,
            bins=edges.tolist(),
            density=True,
            log=log_scale,
            facecolor=(hist_colors[i % len(hist_colors)], 0.35) if i == 0 else "none",
            histtype="stepfilled" if i == 0 else "step",
            linewidth=0.9,
            edgecolor=hist_colors[i % len(hist_colors)],
            label=f"{label} ({values.size:,} entries)",
        )
    if not log_scale:
        hist_ax.set_ylim(bottom=0.0)
    hist_ax.set_ylabel("density (histogram, area = 1)")
    hist_ax.set_xlabel(r"eigenvalue $\lambda$ / diagonal entry")


def _comparison_title(spectra: _Stems) -> str:
    """The default title: the runs' Lanczos steps and, when recorded, where they come from."""
    runs = ", ".join(f"{label} m = {_m(s)}" for s, label, _, _ in spectra)
    where = next((w for w in (source_label(s.config) for s, *_ in spectra) if w is not None), None)
    title = "Lanczos spectra vs diagonal GGN" + (f" ({runs})" if runs else "")
    if where is not None:
        title += f"\n{where}"
    return title

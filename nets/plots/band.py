"""A saved spectrum with its error band, and the bulk fit with its outliers.

Left: the spectral distribution function of the SLQ density with the confidence band
shaded and the certified quadrature bounds drawn (:func:`spectral.plot.plot_cdf_band`; the
title states ``m``, ``K`` probes, ``P`` and the confidence). Right: the smoothed density with
the stored random-matrix fit of its bulk, its edges and the outliers
(:func:`spectral.plot.plot_bulk_fit`), or the smoothed density alone when the file has no
fit (``curvature spectrum --fit mp``).

>>> import numpy as np
>>> arrays = {"w": np.linspace(0.0, 4.0, 40), "gammas": np.full(40, 1 / 40), "num_params": 400}
>>> fig = plot_spectrum_band(arrays)
>>> len(fig.axes)
2
>>> close_figure(fig)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from nets.plots._figure import close_figure, new_subplots, save_figure
from nets.plots._sources import resolve_file
from nets.workflow.bulk import DENSITY_KEYS, bulk_fit, missing_density_keys, spectrum_density
from spectral.io import CorruptFileError, load_npz
from spectral.plot import plot_bulk_fit, plot_cdf_band, plot_smoothed_density

__all__ = ["close_figure", "plot_spectrum_band"]


def plot_spectrum_band(
    source: Any,
    *,
    confidence: float = 0.95,
    save_path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Figure of a spectrum file (path, its arrays or a ``SpectrumResult``) with error bands."""
    if isinstance(source, str | os.PathLike):
        path = resolve_file(source)
        arrays: Mapping[str, Any] = load_npz(path)
        missing = missing_density_keys(arrays)
        if missing:
            raise CorruptFileError(
                f"File '{path}' is not a spectrum of compute_eigenspectrum: it lacks "
                f"{', '.join(map(repr, missing))} (a spectrum file has "
                f"{', '.join(map(repr, DENSITY_KEYS))})."
            )
    elif isinstance(source, Mapping):
        arrays = source
    else:
        arrays = source.to_arrays()
    density = spectrum_density(arrays)
    fig, axes = new_subplots(1, 2, (11.0, 4.2))
    plot_cdf_band(density, axes[0, 0], confidence=confidence, label="SLQ")
    fit = bulk_fit(arrays)
    if fit is not None:
        outliers = np.asarray(arrays.get("outlier_values", []), dtype=np.float64)
        plot_bulk_fit(density, fit, axes[0, 1], outliers=outliers)
    else:
        plot_smoothed_density(density, axes[0, 1])
    if save_path is not None:
        save_figure(fig, save_path)
    return fig

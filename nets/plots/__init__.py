"""Figures of the curvature workflow: spectra, training curves, loss landscapes, Figure 2.

Every function returns a :class:`matplotlib.figure.Figure` (never calls
``plt.show()``) and writes it atomically when given ``save_path``.
"""

from __future__ import annotations

from nets.plots.approximations import plot_approximations
from nets.plots.blocks import plot_block_spectra
from nets.plots.comparison import plot_spectrum_comparison
from nets.plots.landscape import plot_loss_landscape
from nets.plots.spectrum import plot_spectrum, spectrum_summary
from nets.plots.tracking import plot_curvature_tracking
from nets.plots.training import plot_training

__all__ = [
    "plot_approximations",
    "plot_block_spectra",
    "plot_curvature_tracking",
    "plot_loss_landscape",
    "plot_spectrum",
    "plot_spectrum_comparison",
    "plot_training",
    "spectrum_summary",
]

"""spectral.plot renders non-empty images with Agg, without pyplot or global state."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spectral import lanczos, synthetic
from spectral.density import SpectralDensity
from spectral.plot import plot_overlay, plot_ritz_convergence, plot_ritz_stem, plot_smoothed_density
from spectral.quadrature import slq


def _render(ax: Axes) -> np.ndarray:
    """Render the Axes' figure to an RGBA array with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(ax.figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def _non_empty(image: np.ndarray) -> bool:
    # more than a blank canvas: many distinct colours / a large non-white area
    rgb = image[..., :3].reshape(-1, 3)
    non_white = np.mean(np.any(rgb < 250, axis=1))
    return bool(non_white > 0.01 and len(np.unique(rgb, axis=0)) > 5)


@pytest.fixture(scope="module")
def density() -> SpectralDensity:
    A = synthetic.prescribed_spectrum(
        np.concatenate([np.linspace(0, 1, 95), [3, 4, 5, 8, 9]]), seed=0
    )
    return slq(A, 15, num_probes=2, seed=1)


def test_stem_plot_linear_and_log(density: SpectralDensity) -> None:
    ax = plot_ritz_stem(density)
    assert isinstance(ax, Axes) and ax.get_yscale() == "linear"
    assert _non_empty(_render(ax))
    log_ax = plot_ritz_stem(density, log_weights=True, color="C3", markersize=3)
    assert log_ax.get_yscale() == "log"
    lo, _ = log_ax.get_ylim()
    assert lo > 0 and lo <= density.weights.min()
    assert _non_empty(_render(log_ax))


def test_plots_draw_on_a_given_axes(density: SpectralDensity) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_smoothed_density(density, ax, sigma=0.05) is ax
    assert plot_ritz_stem(density, ax) is ax
    line = ax.get_lines()[0]
    x, y = line.get_xdata(), line.get_ydata()
    assert np.trapezoid(np.asarray(y, dtype=float), np.asarray(x, dtype=float)) == pytest.approx(
        1.0, abs=1e-3
    )
    assert _non_empty(_render(ax))


def test_overlay_against_eigenvalues_and_diagonal(density: SpectralDensity) -> None:
    lam = np.concatenate([np.linspace(0, 1, 95), [3, 4, 5, 8, 9]])
    ax = plot_overlay(density, lam, bins=20)
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == pytest.approx(1.0)  # mass per bin, comparable with the stems
    assert _non_empty(_render(ax))
    A = synthetic.two_point(64, -1.0, 1.0, seed=0)
    diag_ax = plot_overlay(slq(A, 5, seed=0), np.diag(A), label="diagonal", log_weights=True)
    assert [t.get_text() for t in diag_ax.get_legend().get_texts()] == ["diagonal", "Lanczos"]
    assert _non_empty(_render(diag_ax))


def test_ritz_convergence(density: SpectralDensity) -> None:
    lam = np.concatenate([np.linspace(0, 1, 95), [3, 4, 5, 8, 9]])
    run = lanczos(np.diag(lam), 12, seed=0)
    ax = plot_ritz_convergence(run.alpha, run.beta, eigenvalues=lam, max_eigenvalue_lines=50)
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == 12 * 13 // 2  # k Ritz values at iteration k
    assert len(ax.get_lines()) == 50
    assert _non_empty(_render(ax))
    with pytest.raises(ValueError, match="beta"):
        plot_ritz_convergence([1.0, 2.0], [1.0, 2.0])


def test_figure_saves_to_png(density: SpectralDensity) -> None:
    ax = plot_smoothed_density(density, kernel="lorentzian", log_density=True)
    buffer = io.BytesIO()
    ax.figure.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG") and len(buffer.getvalue()) > 5000


def test_invalid_density_type() -> None:
    with pytest.raises(TypeError, match="density"):
        plot_ritz_stem(np.array([1.0, 2.0]))  # type: ignore[arg-type]


def test_importing_and_plotting_never_touches_pyplot() -> None:
    code = (
        "import sys\n"
        "import spectral.plot\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'\n"
        "from spectral.density import SpectralDensity\n"
        "ax = spectral.plot.plot_ritz_stem(SpectralDensity([0.0, 1.0], [0.5, 0.5]))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr

"""Figures with error bands: band shaded, bounds drawn, m, P and the confidence stated."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import PolyCollection

from spectral import rmt, slq, synthetic
from spectral.density import SpectralDensity
from spectral.plot import describe_density, plot_bulk_fit, plot_cdf_band

from .strategies import single_threaded_blas  # noqa: F401


def test_cdf_band_figure_shades_the_band_and_states_m_p_confidence() -> None:
    A = synthetic.wigner(200, seed=0)
    lam = np.linalg.eigvalsh(A)
    d = slq(A, 15, num_probes=3, seed=1)
    ax = plot_cdf_band(d, confidence=0.9, exact=lam)
    assert ax.get_title() == "m = 15, P = 3, n = 200, 90% band"
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    # the shaded band is the one cdf_band returns on the drawn grid
    xs = ax.get_lines()[0].get_xdata()
    lo, hi = d.cdf_band(np.asarray(xs), 0.9)
    verts = bands[0].get_paths()[0].vertices
    assert np.isclose(verts[:, 1].min(), lo.min()) and np.isclose(verts[:, 1].max(), hi.max())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["90% band", "quadrature bounds", "SLQ", "exact"]


def test_explicit_probes_draw_bounds_without_a_band() -> None:
    A = synthetic.wigner(60, seed=0)
    d = slq(A, 6, probes=np.random.default_rng(0).standard_normal((60, 2)))
    ax = plot_cdf_band(d)
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert ax.get_title() == "m = 6, P = 2, n = 60"
    ax = plot_cdf_band(d, probe_distribution="gaussian")
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1


def test_bulk_fit_figure_marks_edges_and_outliers() -> None:
    lam = np.linalg.eigvalsh(synthetic.spiked_wigner(300, [4.0], seed=2))
    fit = rmt.fit_semicircle(lam)
    found = rmt.outliers(lam, fit)
    assert len(found) == 1
    ax = plot_bulk_fit(SpectralDensity.from_eigenvalues(lam), fit, outliers=found)
    xs = [line.get_xdata()[0] for line in ax.get_lines()[2:]]
    assert np.allclose(xs, [*fit.support, found.values[0]])
    assert any("W₁" in t.get_text() for t in ax.get_legend().get_texts())
    assert describe_density(SpectralDensity([0.0], [1.0])) == "m = 1, P = 1"

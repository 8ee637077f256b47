"""BBP predictions for negative spikes (an outlier below the bulk: they returned None, "no
outlier", although the generators make one), a covariance spike of -1 or less refused, and
a matrix passed where its eigenvalues are expected refused (it was flattened silently)."""

from __future__ import annotations

import numpy as np
import pytest

from spectral import rmt
from spectral.synthetic import spiked_covariance, spiked_wigner


def test_negative_wigner_spike_gives_the_outlier_below_the_bulk() -> None:
    assert rmt.bbp_wigner(-3.0) == pytest.approx(-3.0 - 1.0 / 3.0, rel=1e-15)
    assert rmt.bbp_wigner(-0.5) is None  # |theta| <= s: stays at the edge
    lam = np.linalg.eigvalsh(np.asarray(spiked_wigner(800, [-3.0], seed=0)))
    assert abs(lam[0] - rmt.bbp_wigner(-3.0)) < 0.2  # O(n^-1/2) fluctuation
    assert lam[1] > -2.1  # the rest is the bulk


def test_negative_covariance_spike_gives_the_outlier_below_the_bulk() -> None:
    q = 0.25
    expected = (1 - 0.9) * (1 + q / -0.9)
    assert rmt.bbp_covariance(-0.9, q) == pytest.approx(expected, rel=1e-15)
    assert rmt.bbp_covariance(-0.4, q) is None  # |theta| <= sqrt(q)
    lam = np.linalg.eigvalsh(np.asarray(spiked_covariance(400, 1600, [-0.9], seed=0)))
    assert abs(lam[0] - expected) < 0.02
    lower_edge = (1 - np.sqrt(q)) ** 2
    assert lam[0] < lower_edge - 0.1 < lam[1]
    for theta in (-1.0, -2.0):  # 1 + theta <= 0 is no covariance
        with pytest.raises(ValueError, match="'theta'"):
            rmt.bbp_covariance(theta, q)


def test_a_matrix_instead_of_its_eigenvalues_is_refused() -> None:
    A = np.asarray(spiked_wigner(50, [0.0], seed=1))
    with pytest.raises(ValueError, match=r"density_or_eigenvalues.*not the matrix"):
        rmt.fit_semicircle(A)
    with pytest.raises(ValueError, match=r"density_or_eigenvalues.*not the matrix"):
        rmt.fit_marchenko_pastur(A)
    fit = rmt.fit_semicircle(np.linalg.eigvalsh(A))
    with pytest.raises(ValueError, match=r"'eigenvalues'.*not the matrix"):
        rmt.outliers(A, fit, n=50)


def test_plot_arguments_are_checked() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from spectral import plot as P
    from spectral.density import SpectralDensity
    from spectral.synthetic import wishart_operator

    d = SpectralDensity([0.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"'alpha'.*finite"):
        P.plot_ritz_convergence([1.0, np.nan], [0.5])
    with pytest.raises(TypeError, match="'fit'"):
        P.plot_bulk_fit(d, "x")
    with pytest.raises(ValueError, match="'num_points'"):
        P.plot_smoothed_density(d, num_points=0)
    with pytest.raises(ValueError, match="'grid'"):
        P.plot_smoothed_density(d, grid=[np.nan, 0.5], sigma=0.1)
    lam = wishart_operator(300, 100, seed=0).eigenvalues()
    fit = rmt.fit_marchenko_pastur(lam)
    ax = P.plot_bulk_fit(SpectralDensity.from_eigenvalues(lam), fit)
    assert fit.atom > 0.5 and "not drawn" in ax.get_lines()[1].get_label()

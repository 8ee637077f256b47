"""Marchenko–Pastur goodness of fit: eigensolver zeros (+-1e-15) count as the atom at 0."""

from __future__ import annotations

import numpy as np
import pytest

from spectral.rmt import fit_marchenko_pastur


@pytest.mark.parametrize("trim", [True, False])
def test_rounded_zeros_give_the_statistics_of_exact_zeros(trim: bool) -> None:
    n, p = 500, 250  # q = 2: an atom of mass 1/2 at 0
    X = np.random.default_rng(0).standard_normal((p, n))
    lam = np.linalg.eigvalsh(X.T @ X / p)
    assert np.sum(lam < 0) > 10  # the zero eigenvalues come out as +-1e-15
    exact = np.where(np.abs(lam) < 1e-12, 0.0, lam)
    fits = [fit_marchenko_pastur(v, trim=trim) for v in (lam, exact, np.abs(lam))]
    for fit in fits:
        assert fit.kolmogorov < 0.02
        assert fit.kolmogorov == pytest.approx(fits[1].kolmogorov, abs=1e-12)
        assert fit.wasserstein == pytest.approx(fits[1].wasserstein, abs=1e-12)


def test_bulk_points_are_not_pooled_into_the_atom() -> None:
    """Only points closer to 0 than half the lower edge a join the atom."""
    n, p = 400, 300  # q = 4/3: lower edge a = (1 - sqrt(4/3))^2 ~ 0.0239
    X = np.random.default_rng(1).standard_normal((p, n))
    lam = np.linalg.eigvalsh(X.T @ X / p)
    fit = fit_marchenko_pastur(lam)
    shifted = np.where(np.abs(lam) < 1e-12, 0.0, lam)
    assert fit.kolmogorov == pytest.approx(fit_marchenko_pastur(shifted).kolmogorov, abs=1e-12)
    assert fit.kolmogorov < 0.05

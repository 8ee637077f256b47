"""spectral.synthetic: known spectra, random-matrix laws and diagonal counterexamples."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from spectral import synthetic as syn
from spectral.density import SpectralDensity

EPS = np.finfo(np.float64).eps


def test_haar_orthogonal_is_orthogonal_and_seeded() -> None:
    Q = syn.haar_orthogonal(50, seed=3)
    np.testing.assert_allclose(Q.T @ Q, np.eye(50), atol=50 * EPS * 10)
    np.testing.assert_array_equal(Q, syn.haar_orthogonal(50, seed=3))
    assert not np.array_equal(Q, syn.haar_orthogonal(50, seed=4))
    rng = np.random.default_rng(0)
    a, b = syn.haar_orthogonal(5, seed=rng), syn.haar_orthogonal(5, seed=rng)
    assert not np.array_equal(a, b)


def test_haar_sign_fix_gives_the_uniform_distribution() -> None:
    # For Haar Q in O(n), Q_11 * sqrt(n) is approximately N(0, 1) and its sign is fair;
    # without the sign fix of R's diagonal, Q_11 would be biased towards one sign.
    n, trials = 8, 600
    rng = np.random.default_rng(11)
    first = np.array([syn.haar_orthogonal(n, seed=rng)[0, 0] for _ in range(trials)])
    # E[Q_11^2] = 1/n exactly; E[Q_11] = 0. Bounds at ~5 standard errors.
    assert abs(first.mean()) < 5 * np.sqrt(1.0 / n / trials)
    assert abs((first**2).mean() - 1.0 / n) < 5 * np.sqrt(2.0 / (n * (n + 2)) / trials)
    # Q_11^2 ~ Beta(1/2, (n-1)/2)
    ks = scipy.stats.kstest(first**2, scipy.stats.beta(0.5, (n - 1) / 2).cdf)
    assert ks.pvalue > 1e-4


@pytest.mark.parametrize("n", [1, 7, 64])
def test_prescribed_spectrum_is_exact(n: int) -> None:
    lam = np.random.default_rng(n).normal(size=n) * 10
    A = syn.prescribed_spectrum(lam, seed=0)
    np.testing.assert_array_equal(A, A.T)
    err = np.abs(np.linalg.eigvalsh(A) - np.sort(lam)).max()
    assert err <= 20 * n * EPS * np.abs(lam).max()


def test_low_rank_has_exact_rank_and_given_values() -> None:
    A = syn.low_rank(40, 3, seed=0, eigenvalues=[5.0, -2.0, 1.0])
    lam = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(lam[[0, -2, -1]], [-2.0, 1.0, 5.0], atol=1e-13)
    assert np.abs(lam[1:-2]).max() < 1e-13
    assert np.linalg.matrix_rank(A) == 3
    assert not syn.low_rank(4, 0, seed=0).any()
    with pytest.raises(ValueError, match="eigenvalues"):
        syn.low_rank(5, 2, seed=0, eigenvalues=[1.0])
    with pytest.raises(ValueError, match="rank"):
        syn.low_rank(5, 6, seed=0)


def test_low_effective_rank_profile() -> None:
    A = syn.low_effective_rank(100, 5, seed=0, tail_strength=0.1)
    lam = np.sort(np.linalg.eigvalsh(A))[::-1]
    i = np.arange(100) / 5
    expected = 0.9 * np.exp(-(i**2)) + 0.1 * np.exp(-0.1 * i)
    np.testing.assert_allclose(lam, expected, atol=1e-13)
    # most of the energy sits in the head
    assert lam[:10].sum() > 0.5 * lam.sum()


def test_wigner_follows_the_semicircle() -> None:
    n = 400
    W = syn.wigner(n, seed=0, radius=3.0)
    np.testing.assert_array_equal(W, W.T)
    lam = np.linalg.eigvalsh(W)
    # variance r^2 / 4; edges at +-r up to O(n^{-2/3})
    assert np.mean(lam**2) == pytest.approx(9.0 / 4.0, rel=0.03)
    assert abs(lam.max() - 3.0) < 0.15 and abs(lam.min() + 3.0) < 0.15
    grid = np.linspace(-3, 3, 2001)
    cdf = scipy.integrate.cumulative_trapezoid(syn.semicircle_pdf(grid, 3.0), grid, initial=0)
    assert cdf[-1] == pytest.approx(1.0, abs=1e-4)
    ks = np.abs(np.searchsorted(np.sort(lam), grid) / n - cdf).max()
    assert ks < 0.03


def test_semicircle_pdf_moments() -> None:
    x = np.linspace(-2, 2, 20001)
    rho = syn.semicircle_pdf(x)
    assert np.trapezoid(rho, x) == pytest.approx(1.0, abs=1e-5)
    assert np.trapezoid(x**2 * rho, x) == pytest.approx(1.0, abs=1e-5)  # Catalan C_1
    assert np.trapezoid(x**4 * rho, x) == pytest.approx(2.0, abs=1e-4)  # Catalan C_2
    assert syn.semicircle_pdf(2.5) == 0.0


@pytest.mark.parametrize("ratio", [0.25, 1.0, 4.0])
def test_marchenko_pastur_pdf_mass_and_mean(ratio: float) -> None:
    a, b = syn.marchenko_pastur_support(ratio, variance=2.0)
    x = np.linspace(a, b, 400001)
    rho = syn.marchenko_pastur_pdf(x, ratio, variance=2.0)
    continuous = np.trapezoid(rho, x)
    atom = syn.marchenko_pastur_atom(ratio)
    # ratio = 1 has an integrable 1/sqrt(x) singularity at 0: looser quadrature
    tol = 5e-3 if ratio == 1.0 else 1e-5
    assert continuous + atom == pytest.approx(1.0, abs=tol)
    assert np.trapezoid(x * rho, x) == pytest.approx(2.0, abs=2 * tol)  # mean = variance


def test_wishart_operator_matches_dense_and_exact_eigenvalues() -> None:
    op = syn.wishart_operator(30, 12, seed=5, variance=0.5)
    dense = syn.wishart(30, 12, seed=5, variance=0.5)
    np.testing.assert_allclose(op.to_dense(), dense)
    v = np.random.default_rng(0).normal(size=30)
    np.testing.assert_allclose(op.matvec(v), dense @ v, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(op.matmat(np.eye(30)), dense, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(
        op.eigenvalues(), np.clip(np.linalg.eigvalsh(dense), 0, None), atol=1e-12
    )
    assert np.sum(op.eigenvalues() == 0.0) == 18
    assert op.T is op.H or np.allclose(op.T.matvec(v), op.matvec(v))


def test_wishart_follows_marchenko_pastur() -> None:
    n, p = 300, 1200
    lam = syn.wishart_operator(n, p, seed=1).eigenvalues()
    a, b = syn.marchenko_pastur_support(n / p)
    assert lam.min() > a - 0.1 and lam.max() < b + 0.1
    assert lam.mean() == pytest.approx(1.0, rel=0.02)
    x = np.linspace(a, b, 4001)
    cdf = scipy.integrate.cumulative_trapezoid(syn.marchenko_pastur_pdf(x, n / p), x, initial=0)
    ks = np.abs(np.searchsorted(lam, x) / n - cdf).max()
    assert ks < 0.04


def test_spiked_wigner_bbp_outlier() -> None:
    A = syn.spiked_wigner(800, [3.0, 0.5], seed=2)
    lam = np.linalg.eigvalsh(A)
    assert lam[-1] == pytest.approx(3.0 + 1.0 / 3.0, abs=0.12)  # theta + 1/theta
    assert lam[-2] < 2.15  # the sub-critical spike hides in the bulk


def test_spiked_covariance_bbp_outlier() -> None:
    n, p, theta = 200, 800, 4.0
    q = n / p
    lam = np.linalg.eigvalsh(syn.spiked_covariance(n, p, [theta], seed=3))
    assert lam[-1] == pytest.approx((1 + theta) * (1 + q / theta), rel=0.08)
    assert lam[-2] < (1 + np.sqrt(q)) ** 2 + 0.15
    with pytest.raises(ValueError, match="spikes"):
        syn.spiked_covariance(10, 20, [-1.5], seed=0)


def test_two_point_diagonal_concentrates_at_the_mean() -> None:
    # Appendix C: the diagonal histogram is arbitrarily far from the spectrum.
    n = 256
    spectrum = np.repeat([-1.0, 1.0], n // 2)
    for gap in (2.0, 20.0):
        A = syn.two_point(n, -gap / 2, gap / 2, seed=0)
        diag = np.diag(A)
        # a_ii = sum_j Q_ij^2 lambda_j has mean 0 and sd (gap/2) * sqrt(2/(n+2))
        assert np.abs(diag).max() < 5 * (gap / 2) * np.sqrt(2.0 / (n + 2))
        w1 = SpectralDensity.from_eigenvalues(diag).wasserstein(spectrum * gap / 2)
        assert w1 > 0.45 * gap  # grows linearly with the gap
    lam = np.linalg.eigvalsh(syn.two_point(n, -1.0, 1.0, seed=0))
    np.testing.assert_allclose(lam, spectrum, atol=1e-12)


def test_constant_diagonal_is_exact_for_any_spectrum() -> None:
    lam = np.random.default_rng(0).standard_cauchy(64)
    A = syn.constant_diagonal(lam, seed=1)
    np.testing.assert_allclose(np.diag(A), lam.mean(), atol=1e-12 * np.abs(lam).max())
    np.testing.assert_allclose(np.linalg.eigvalsh(A), np.sort(lam), atol=1e-11 * np.abs(lam).max())
    with pytest.raises(ValueError, match="power of two"):
        syn.constant_diagonal(np.ones(6), seed=0)


def test_flat_rank_one_hides_its_outlier_from_the_diagonal() -> None:
    A = syn.flat_rank_one(100, 50.0, seed=0)
    np.testing.assert_allclose(np.diag(A), 0.5)
    lam = np.linalg.eigvalsh(A)
    assert lam[-1] == pytest.approx(50.0)
    assert np.abs(lam[:-1]).max() < 1e-12


@pytest.mark.parametrize(
    "call",
    [
        lambda: syn.haar_orthogonal(0, seed=0),
        lambda: syn.haar_orthogonal(3, seed=-1),
        lambda: syn.prescribed_spectrum([[1.0]], seed=0),
        lambda: syn.wigner(3, seed=0, radius=0.0),
        lambda: syn.marchenko_pastur_support(0.0),
        lambda: syn.two_point(4, 0.0, 1.0, seed=0, fraction_high=2.0),
        lambda: syn.GramOperator(np.zeros(3)),
    ],
)
def test_invalid_arguments_name_the_argument(call: object) -> None:
    with pytest.raises((ValueError, TypeError), match="Argument '"):
        call()  # type: ignore[operator]


def test_seed_is_required() -> None:
    with pytest.raises(TypeError):
        syn.wigner(3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="seed"):
        syn.wigner(3, seed=None)  # type: ignore[arg-type]

"""Random-matrix fits: Marchenko-Pastur and semicircle recovered, outliers at the BBP positions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

from spectral import slq, synthetic
from spectral.rmt import (
    MarchenkoPasturFit,
    SemicircleFit,
    bbp_covariance,
    bbp_wigner,
    fit_marchenko_pastur,
    fit_semicircle,
    outliers,
    probe_margin,
)

from .strategies import single_threaded_blas  # noqa: F401


def mp_moment(p: int, q: float) -> float:
    """Raw moment of the Marchenko-Pastur law (variance 1): Narayana polynomials."""
    return {1: 1.0, 2: 1 + q, 3: 1 + 3 * q + q * q, 4: 1 + 6 * q + 6 * q * q + q**3}[p]


def one_probe_sd(q: float, n: int) -> tuple[float, float]:
    """Standard deviations of (ratio, variance) fitted from one probe's quadrature moments.

    The fitted ratio is m2/m1^2 - 1; to first order its error is the probe's error in
    int f dmu with f = x^2 - 2(1+q)x, whose variance is at most 2 Var_MP(f)/n (Rademacher;
    the quadratic-form variance of f(A)); the variance's error is that of m1, 2 Var_MP(x)/n.
    """
    ef = mp_moment(2, q) - 2 * (1 + q)
    ef2 = mp_moment(4, q) - 4 * (1 + q) * mp_moment(3, q) + 4 * (1 + q) ** 2 * mp_moment(2, q)
    return float(np.sqrt(2 * (ef2 - ef * ef) / n)), float(np.sqrt(2 * q / n))


@pytest.fixture(scope="module")
def wishart() -> tuple[synthetic.GramOperator, np.ndarray]:
    # n = 4000, ratio q = 4 (p = 1000): exact spectrum from the 1000 x 1000 Gram matrix.
    op = synthetic.wishart_operator(4000, 1000, seed=2024)
    return op, op.eigenvalues()


def test_marchenko_pastur_from_exact_eigenvalues(
    wishart: tuple[synthetic.GramOperator, np.ndarray],
) -> None:
    _, lam = wishart
    fit = fit_marchenko_pastur(lam)
    # Linear statistics of the exact spectrum fluctuate by O(1/n): far inside 1%.
    assert fit.ratio == pytest.approx(4.0, rel=0.01)
    assert fit.variance == pytest.approx(1.0, rel=0.01)
    assert fit.support == pytest.approx(synthetic.marchenko_pastur_support(fit.ratio, fit.variance))
    assert fit.atom == pytest.approx(0.75, rel=0.01)
    assert fit.bulk_mass == 1.0 and fit.dimension == 4000
    assert fit.kolmogorov < 0.01 and fit.wasserstein < 0.01
    # A wrong law is far: the semicircle fit of the same data.
    assert fit_semicircle(lam, trim=False).kolmogorov > 0.3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_marchenko_pastur_from_one_probe_slq(
    wishart: tuple[synthetic.GramOperator, np.ndarray], probe: str
) -> None:
    op, lam = wishart
    sd_ratio, sd_variance = one_probe_sd(4.0, 4000)  # 0.20 (5%) and 0.045 (4.5%)
    exact = fit_marchenko_pastur(lam)
    for seed in (1, 2):
        fit = fit_marchenko_pastur(slq(op, 10, probe=probe, seed=seed))
        assert abs(fit.ratio - exact.ratio) <= 3 * sd_ratio
        assert abs(fit.variance - exact.variance) <= 3 * sd_variance
        assert "quadrature moments" in fit.method
    # Ten probes: the probe fluctuation shrinks by sqrt(10), within a few per cent.
    fit = fit_marchenko_pastur(slq(op, 4, num_probes=10, probe=probe, seed=3))
    assert abs(fit.ratio - exact.ratio) <= 3 * sd_ratio / np.sqrt(10)  # 4.7%
    assert abs(fit.variance - exact.variance) <= 3 * sd_variance / np.sqrt(10)


def test_marchenko_pastur_law_functions() -> None:
    for q in (0.25, 1.0, 3.0):
        fit = MarchenkoPasturFit.from_parameters(q, 2.0)
        x = np.linspace(-1.0, 20.0, 200001)
        np.testing.assert_allclose(
            fit.pdf(x), synthetic.marchenko_pastur_pdf(x, q, 2.0), rtol=1e-12, atol=1e-300
        )
        a, b = fit.support
        mid = np.linspace(a, b, 7)[1:-1]
        # CDF against a trapezoid integral of the pdf (fine grid, sqrt edge singularities)
        inner = x[(x > a) & (x < b)]
        cum = np.concatenate(
            [[0.0], np.cumsum(np.diff(inner) * (fit.pdf(inner)[1:] + fit.pdf(inner)[:-1]) / 2)]
        )
        ref = np.interp(mid, inner, cum) + fit.atom
        np.testing.assert_allclose(fit.cdf(mid), ref, atol=2e-3)
        assert float(fit.cdf(b + 1.0)) == pytest.approx(1.0)
        s = np.array([0.1, 0.5, 0.9])
        np.testing.assert_allclose(fit.cdf(fit.quantile(s)), np.maximum(s, fit.atom), atol=1e-6)


def test_semicircle_from_exact_eigenvalues_and_one_probe_slq() -> None:
    lam = np.linalg.eigvalsh(synthetic.wigner(1000, seed=5, radius=3.0))
    fit = fit_semicircle(lam)
    assert fit.radius == pytest.approx(3.0, rel=0.01) and abs(fit.center) < 0.01
    assert fit.kolmogorov < 0.02 and fit.bulk_mass == 1.0
    # One probe at n = 4000: the radius 2 sqrt(m2 - m1^2) moves by about sqrt(2/n) r/2 (1.1%).
    # A sparse Wigner matrix (1% of the entries, variance 1/(0.01 n)) keeps products cheap;
    # its second moment, all the radius depends on, is that of the dense one.
    n, density = 4000, 0.01
    rng = np.random.default_rng(6)
    S = scipy.sparse.random(n, n, density=density, random_state=rng, data_rvs=rng.standard_normal)
    W = ((S + S.T) / np.sqrt(2.0 * density * n)).tocsr()
    fit = fit_semicircle(slq(W, 20, seed=7))
    assert fit.radius == pytest.approx(2.0, abs=3 * np.sqrt(2 / 4000) * 2.0)
    assert abs(fit.center) <= 3 * np.sqrt(2 / 4000)


def test_semicircle_law_functions() -> None:
    fit = SemicircleFit.from_parameters(1.5, 0.5)
    x = np.linspace(-1.5, 2.5, 400001)
    assert np.trapezoid(fit.pdf(x), x) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(fit.pdf(x), synthetic.semicircle_pdf(x - 0.5, 1.5))
    assert float(fit.cdf(0.5)) == pytest.approx(0.5)
    s = np.linspace(0.01, 0.99, 9)
    np.testing.assert_allclose(fit.cdf(fit.quantile(s)), s, atol=1e-6)


def test_spiked_covariance_outliers_match_bbp() -> None:
    n, p = 800, 1600  # q = 1/2, BBP threshold sqrt(q) = 0.71
    q = n / p
    spikes = np.array([0.2, 0.5, 2.0, 4.0, 8.0])
    A = synthetic.spiked_covariance(n, p, spikes, seed=9)
    lam = np.linalg.eigvalsh(A)
    fit = fit_marchenko_pastur(lam)
    assert fit.ratio == pytest.approx(q, rel=0.03) and fit.variance == pytest.approx(1.0, rel=0.02)
    found = outliers(lam, fit)
    expected = sorted(
        v for v in (bbp_covariance(t, q) for t in spikes) if v is not None
    )  # spikes above sqrt(q) only
    assert len(found) == len(expected) == 3
    # Gaussian fluctuations of a supercritical spike l = 1 + theta (Paul 2007):
    # sd = sqrt(2 l^2 (1 - q / theta^2) / p).
    for value, theta, target in zip(found.values, spikes[2:], expected):
        sd = np.sqrt(2 * (1 + theta) ** 2 * (1 - q / theta**2) / p)
        assert abs(value - target) <= 4 * sd
    assert np.all(found.scales > 4.0)
    assert found.indices.tolist() == [n - 3, n - 2, n - 1]


def test_spiked_wigner_outliers_and_residuals() -> None:
    n = 1000
    A = synthetic.spiked_wigner(n, [0.5, 2.0, 5.0], seed=4)
    lam = np.linalg.eigvalsh(A)
    fit = fit_semicircle(lam)
    assert fit.radius == pytest.approx(2.0, rel=0.02)
    found = outliers(lam, fit, residuals=np.arange(n) * 1e-3)
    assert found.values == pytest.approx([bbp_wigner(2.0), bbp_wigner(5.0)], abs=0.15)
    assert found.residuals is not None and found.residuals.tolist() == pytest.approx(
        [(n - 2) * 1e-3, (n - 1) * 1e-3]
    )
    assert fit.spike_outlier(0.5) is None and fit.spike_outlier(5.0) == pytest.approx(
        5.0 + fit.radius**2 / 4 / 5.0 + fit.center
    )
    # Untrimmed, the outliers inflate the fitted radius.
    assert fit_semicircle(lam, trim=False).radius > fit.radius


def test_rmt_validation() -> None:
    with pytest.raises(ValueError, match="density_or_eigenvalues"):
        fit_marchenko_pastur([1.0])
    with pytest.raises(ValueError, match="density_or_eigenvalues"):
        fit_marchenko_pastur([-1.0, -2.0, -3.0])
    with pytest.raises(ValueError, match="num_scales"):
        fit_semicircle([0.0, 1.0], num_scales=-1.0)
    fit = SemicircleFit.from_parameters(2.0)
    with pytest.raises(ValueError, match="'n'"):
        outliers([3.0], fit)
    with pytest.raises(TypeError, match="fit"):
        outliers([3.0], "semicircle", n=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="residuals"):
        outliers([3.0], fit, n=10, residuals=[1.0, 2.0])
    with pytest.raises(ValueError, match="ratio"):
        bbp_covariance(1.0, 0.0)


EPS = float(np.finfo(np.float64).eps)


def wigner_spectrum(seed: int, n: int) -> np.ndarray:
    """Eigenvalues of an ``n x n`` GOE matrix scaled to the semicircle of radius 2."""
    W = np.random.default_rng(seed).standard_normal((n, n))
    return np.linalg.eigvalsh((W + W.T) / np.sqrt(2.0 * n))


def wishart_spectrum(seed: int, n: int) -> np.ndarray:
    """Eigenvalues of ``X^T X / p`` for a ``p x n`` Gaussian ``X``, ``p = 2n`` (ratio 1/2)."""
    X = np.random.default_rng(seed).standard_normal((2 * n, n))
    return np.linalg.eigvalsh(X.T @ X / (2 * n))


@given(st.integers(0, 2**16), st.integers(3, 60), st.floats(-1e12, 1e12))
def test_semicircle_fit_is_shift_equivariant(seed: int, n: int, shift: float) -> None:
    """fit(c + x) = fit(x) shifted by c, up to the rounding of the shifted points.

    Rounding ``c + x_i`` moves each point by at most ``eps M / 2`` (``M = max|c + x|``);
    the standard deviation is 1-Lipschitz in the points, so the radius ``2 s`` moves by at
    most ``eps M``, and the centre by ``eps M / 2``. Each fit adds its own summation error,
    ``(n + 3) eps`` relative for ``s`` and ``(n + 1) eps max|deviation|`` plus a rounding
    of ``M`` for the centre. The raw-moment formula ``2 sqrt(m2 - m1^2)`` gave radius 2.83
    instead of 2.0 at ``c = 1e8``.
    """
    x = wigner_spectrum(seed, n)
    y = shift + x
    big = float(np.max(np.abs(y)))
    ref, fit = fit_semicircle(x, trim=False), fit_semicircle(y, trim=False)
    assert abs(fit.radius - ref.radius) <= 2 * EPS * big + 4 * (n + 3) * EPS * ref.radius
    spread = float(np.max(np.abs(x - ref.center)))
    assert abs(fit.center - (shift + ref.center)) <= 4 * EPS * big + 4 * (n + 1) * EPS * spread


@given(st.integers(0, 2**16), st.integers(3, 60), st.integers(-1000, 1000), st.booleans())
def test_semicircle_fit_scales_exactly_by_powers_of_two(
    seed: int, n: int, e: int, negate: bool
) -> None:
    """Scaling by ``+-2**e`` is exact, and so is every step of the fit (trimming included)."""
    x = wigner_spectrum(seed, n) + 1.0
    s = -(2.0**e) if negate else 2.0**e
    ref, fit = fit_semicircle(x, num_scales=1.0), fit_semicircle(x * s, num_scales=1.0)
    assert fit.radius == abs(s) * ref.radius
    assert fit.center == s * ref.center
    assert fit.bulk_mass == ref.bulk_mass


@given(st.integers(0, 2**16), st.integers(3, 60), st.integers(-1000, 1000))
def test_marchenko_pastur_fit_scales_exactly_by_powers_of_two(seed: int, n: int, e: int) -> None:
    x = wishart_spectrum(seed, n)
    ref, fit = (
        fit_marchenko_pastur(x, num_scales=1.0),
        fit_marchenko_pastur(x * 2.0**e, num_scales=1.0),
    )
    assert fit.ratio == ref.ratio
    assert fit.variance == 2.0**e * ref.variance
    assert fit.bulk_mass == ref.bulk_mass


@given(st.integers(0, 2**16), st.integers(3, 60), st.sampled_from([1e160, 3.7e-170, 1e300, 1e-300]))
def test_marchenko_pastur_fit_of_spectra_of_any_magnitude(seed: int, n: int, scale: float) -> None:
    """fit(s x): variance s times, same ratio, up to the rounding of ``s x_i`` (relative
    ``eps / 2`` each: the mean moves by ``eps / 2`` relative, the standard deviation by
    ``eps M / 2``) and each fit's summation error (``(n + 3) eps`` relative). Before, the
    squares of the points overflowed (1e160) or underflowed (1e-170) and the fit refused
    the spectrum as "not a Marchenko-Pastur bulk".
    """
    x = wishart_spectrum(seed, n)
    ref, fit = fit_marchenko_pastur(x, trim=False), fit_marchenko_pastur(x * scale, trim=False)
    std = float(np.std(x))
    q_tol = 2 * EPS * (float(np.max(x)) / std + 1) + 8 * (n + 3) * EPS
    assert abs(fit.ratio / ref.ratio - 1) <= q_tol
    assert abs(fit.variance / scale / ref.variance - 1) <= 4 * (n + 2) * EPS
    # the law's functions are scale-free too: pdf(s x) = pdf(x) / s
    grid = np.linspace(*ref.support, 9)[1:-1]  # inside: the edges differ by rounding
    np.testing.assert_allclose(fit.pdf(grid * scale) * scale, ref.pdf(grid), rtol=1e-9)
    np.testing.assert_allclose(fit.cdf(grid * scale), ref.cdf(grid), rtol=1e-9, atol=1e-12)


def test_law_functions_propagate_nan() -> None:
    for fit in (MarchenkoPasturFit.from_parameters(0.5), SemicircleFit.from_parameters(2.0)):
        assert np.isnan(fit.pdf(np.nan)) and np.isnan(fit.cdf(np.nan))
        assert np.isnan(fit.pdf([1.0, np.nan])).tolist() == [False, True]


def test_rmt_parameter_validation() -> None:
    fit = SemicircleFit.from_parameters(2.0)
    with pytest.raises(ValueError, match=r"Argument 'num_probes'.*positive integer"):
        probe_margin(fit, 100, 0)
    with pytest.raises(ValueError, match="Argument 'n'"):
        probe_margin(fit, 0, 1)
    with pytest.raises(ValueError, match=r"Argument 'variance'.*positive"):
        bbp_covariance(4.0, 0.25, variance=-1.0)
    with pytest.raises(ValueError, match="Argument 'center'"):
        bbp_wigner(4.0, center=float("nan"))

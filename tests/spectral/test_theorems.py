"""Theorems 1 and 2 of the paper (Section 4) as property tests.

Theorem 1: from the same start vector, Lanczos on ``-A + mu I`` produces
``alpha' = mu - alpha``, ``beta' = beta``, Ritz values ``mu - theta`` with the
same weights and the same Krylov space: shifting and flipping teaches nothing new.

Theorem 2: Ritz values interlace with the eigenvalues (Cauchy), and when the
spectrum is dominated by its bulk the ``m`` Ritz values are *not* the top ``m``
eigenvalues; they are only when the wanted eigenvalues are well separated from
the bulk (and even then one or more Ritz values stay in the bulk to carry its
weight).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral import as_operator, lanczos
from tests.spectral.strategies import (
    rotated_matrices,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

EPS = np.finfo(np.float64).eps


def _stable_prefix(beta: np.ndarray, k: int, scale: float) -> int:
    """Number of leading steps compared coefficient by coefficient.

    The Lanczos coefficients are a forward-unstable function of the start vector
    once some ``beta_j`` is small (a near-invariant subspace): two backward-stable
    runs then drift apart although both are exact for nearby problems.  Up to the
    first ``beta_j < 1e-2 ||A||`` (and ``m <= 12``) the two runs agree to ~1e-10.
    """
    small = np.flatnonzero(beta[: k - 1] < 1e-2 * scale)
    return int(small[0]) + 1 if small.size else k


def _grouped_weights(values: np.ndarray, weights: np.ndarray, gap: float) -> np.ndarray:
    """Weights summed over clusters of Ritz values closer than ``gap`` (ill-conditioned apart)."""
    starts = np.r_[0, np.flatnonzero(np.diff(values) > gap) + 1]
    return np.add.reduceat(weights, starts)


@given(
    data=rotated_matrices(max_n=80),
    m=st.integers(1, 12),
    mu=st.floats(-50.0, 50.0, allow_nan=False),
    seed=st.integers(0, 1000),
)
def test_theorem_1_shift_and_flip(
    data: tuple[np.ndarray, np.ndarray], m: int, mu: float, seed: int
) -> None:
    A, spectrum = data
    n = A.shape[0]
    m = min(m, n)
    v0 = np.random.default_rng(seed).standard_normal(n)
    base = lanczos(A, m, v0=v0)
    flipped = lanczos(-A + mu * np.eye(n), m, v0=v0)
    scale = float(np.max(np.abs(spectrum))) + abs(mu)
    k = _stable_prefix(base.beta, min(base.num_iters, flipped.num_iters), scale)
    # the recurrence coefficients: alpha' = mu - alpha, beta' = beta
    np.testing.assert_allclose(flipped.alpha[:k], mu - base.alpha[:k], atol=1e-8 * scale)
    np.testing.assert_allclose(flipped.beta[: k - 1], base.beta[: k - 1], atol=1e-8 * scale)
    # the same Krylov space: the orthogonal projectors agree
    Qb, Qf = base.basis[:, :k], flipped.basis[:, :k]
    assert np.linalg.norm(Qb @ (Qb.T @ Qf) - Qf) <= 1e-6
    if k == base.num_iters == flipped.num_iters:
        b, f = base.ritz(), flipped.ritz()
        # Ritz values mu - theta (order reversed) with the same quadrature weights
        np.testing.assert_allclose(f.values, (mu - b.values)[::-1], atol=1e-8 * scale)
        gap = 1e-4 * scale
        np.testing.assert_allclose(
            _grouped_weights(f.values, f.weights, gap),
            _grouped_weights(f.values, b.weights[::-1], gap),
            atol=1e-5,
        )
        for p in range(1, 4):  # the quadrature measures agree (well conditioned)
            got = np.sum(f.weights * (f.values / scale) ** p)
            want = np.sum(b.weights * ((mu - b.values) / scale) ** p)
            assert got == pytest.approx(want, abs=1e-9)


@given(
    data=rotated_matrices(max_n=80),
    m=st.integers(1, 12),
    c=st.floats(0.01, 100.0).flatmap(lambda x: st.sampled_from([x, -x])),
)
def test_theorem_1_scaling(data: tuple[np.ndarray, np.ndarray], m: int, c: float) -> None:
    A, spectrum = data
    n = A.shape[0]
    v0 = np.random.default_rng(1).standard_normal(n)
    base = lanczos(A, min(m, n), v0=v0)
    scaled = lanczos(c * A, min(m, n), v0=v0)
    scale = abs(c) * float(np.max(np.abs(spectrum)))
    k = _stable_prefix(abs(c) * base.beta, min(base.num_iters, scaled.num_iters), scale)
    np.testing.assert_allclose(scaled.alpha[:k], c * base.alpha[:k], atol=1e-8 * scale)
    np.testing.assert_allclose(scaled.beta[: k - 1], abs(c) * base.beta[: k - 1], atol=1e-8 * scale)
    if k == base.num_iters == scaled.num_iters:
        expected = np.sort(c * base.ritz().values)
        np.testing.assert_allclose(scaled.ritz().values, expected, atol=1e-8 * scale)


@given(data=rotated_matrices(max_n=80), m=st.integers(1, 30), seed=st.integers(0, 1000))
def test_theorem_2_cauchy_interlacing(
    data: tuple[np.ndarray, np.ndarray], m: int, seed: int
) -> None:
    """``lambda_i <= theta_i <= lambda_{n-k+i}`` (ascending, ``k`` Ritz values)."""
    A, spectrum = data
    n = A.shape[0]
    res = lanczos(A, min(m, n), seed=seed)
    theta = res.ritz().values
    k = theta.size
    tol = 1e-11 * float(np.max(np.abs(spectrum)))
    assert np.all(spectrum[:k] <= theta + tol)
    assert np.all(theta <= spectrum[n - k :] + tol)


def _diagonal_operator(spectrum: np.ndarray) -> object:
    # Lanczos on Q diag(s) Q^T from a uniform unit vector v equals Lanczos on diag(s)
    # from Q^T v, again uniform on the sphere: the diagonal form is the same experiment.
    return as_operator(lambda x: spectrum * x, size=spectrum.size)


N, M, SEEDS = 2000, 10, 40


def test_theorem_2_bulk_dominated_ritz_values_are_not_the_top_eigenvalues() -> None:
    """n = 2000: 1990 eigenvalues U[0, 1] and 10 outliers 1.01..1.10; m = 10."""
    rng = np.random.default_rng(2024)
    spectrum = np.sort(np.r_[rng.uniform(0.0, 1.0, N - 10), np.linspace(1.01, 1.10, 10)])
    top = spectrum[-M:]
    op = _diagonal_operator(spectrum)
    matched = []
    for seed in range(SEEDS):
        res = lanczos(op, M, seed=seed)
        theta = res.ritz().values
        # quadrature is exact for degree 1: sum w theta = q^T A q ~ tr(A)/n ~ 0.5; Ritz values
        # all >= lambda_{n-m+1} = 1.01 would force that first moment above 1.01.
        assert float(res.alpha[0]) < top[0]
        assert np.sum(theta < 1.0) >= M - 2  # most Ritz values sit inside the bulk
        close = np.min(np.abs(theta[:, None] - top[None, :]), axis=1) < 1e-3
        matched.append(int(close.sum()))
        assert not np.allclose(theta, top, atol=1e-3)
    assert max(matched) <= 2
    assert np.mean(matched) < 1.0


@pytest.mark.parametrize(
    ("outliers", "found"),
    [
        (np.linspace(1.01, 1.05, 5), False),  # bulk-dominated: outliers hug the bulk
        (np.linspace(10.0, 50.0, 5), True),  # well-separated spikes
    ],
)
def test_theorem_2_two_regimes(outliers: np.ndarray, found: bool) -> None:
    """Same structure (n = 2000, 5 outliers, m = 10), only the separation differs.

    Well-separated spikes are found to 1e-6 relative accuracy by the top Ritz values
    for every seed; outliers hugging the bulk are not, for any seed.
    """
    rng = np.random.default_rng(7)
    k = outliers.size
    spectrum = np.sort(np.r_[rng.uniform(0.0, 1.0, N - k), outliers])
    op = _diagonal_operator(spectrum)
    for seed in range(SEEDS):
        theta = lanczos(op, M, seed=seed).ritz().values
        err = np.max(np.abs(theta[-k:] - spectrum[-k:]) / spectrum[-k:])
        if found:
            assert err <= 1e-6
        else:
            assert err > 1e-3
        # in both regimes the remaining Ritz values stay inside the bulk
        assert np.all(theta[:-k] <= 1.0 + 1e-12)

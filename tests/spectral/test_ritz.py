"""Ritz pairs: ordering, quadrature weights, vectors, residual norms and convergence flags."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral import NumericalError, lanczos, ritz_pairs
from spectral.ritz import tridiagonal_eigh
from tests.spectral.strategies import (
    rotated_matrices,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

EPS = np.finfo(np.float64).eps


@given(data=rotated_matrices(max_n=80), m=st.integers(1, 30), seed=st.integers(0, 100))
def test_ritz_pairs_of_a_lanczos_run(
    data: tuple[np.ndarray, np.ndarray], m: int, seed: int
) -> None:
    A, spectrum = data
    res = lanczos(A, min(m, A.shape[0]), seed=seed)
    pairs = res.ritz()
    k = res.num_iters
    norm_a = float(np.max(np.abs(spectrum)))
    assert len(pairs) == k
    assert np.all(np.diff(pairs.values) >= 0)
    assert np.all(pairs.weights >= 0)
    assert pairs.weights.sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(
        pairs.values, np.linalg.eigvalsh(res.tridiagonal()), atol=1e-12 * norm_a
    )
    # Ritz values lie inside the spectrum
    assert pairs.values[0] >= spectrum[0] - 1e-12 * norm_a
    assert pairs.values[-1] <= spectrum[-1] + 1e-12 * norm_a
    # vectors: orthonormal, and ||A y - theta y|| = |beta_m s_mi| up to rounding
    Y = pairs.vectors
    assert Y.shape == (A.shape[0], k)
    np.testing.assert_allclose(Y.T @ Y, np.eye(k), atol=100 * k * EPS)
    true_res = np.linalg.norm(A @ Y - Y * pairs.values, axis=0)
    np.testing.assert_allclose(true_res, pairs.residuals, atol=100 * k * EPS * norm_a)
    # first components of the eigenvectors of T give the weights: (q1^T y_i)^2
    q1 = res.basis[:, 0]
    np.testing.assert_allclose((q1 @ Y) ** 2, pairs.weights, atol=100 * k * EPS)


def test_convergence_flags_follow_the_residuals() -> None:
    rng = np.random.default_rng(0)
    spectrum = np.r_[np.linspace(0.0, 1.0, 196), [20.0, 30.0, 40.0, 50.0]]
    A = np.diag(spectrum)
    res = lanczos(A, 12, v0=rng.standard_normal(200))
    pairs = res.ritz(tol=1e-8)
    scale = np.max(np.abs(pairs.values))
    np.testing.assert_array_equal(pairs.converged, pairs.residuals <= 1e-8 * scale)
    # the outliers have converged, the bulk Ritz values have not
    assert np.all(pairs.converged[-4:])
    assert not np.any(pairs.converged[:-4])
    np.testing.assert_allclose(pairs.values[-4:], [20.0, 30.0, 40.0, 50.0], rtol=1e-8)


def test_ritz_pairs_direct_use_and_validation() -> None:
    p = ritz_pairs(np.array([3.0]), np.array([]), residual_norm=0.0)
    assert p.values.tolist() == [3.0] and p.weights.tolist() == [1.0] and p.vectors is None
    p = ritz_pairs(np.array([0.0, 0.0]), np.array([1.0]), residual_norm=0.0, basis=np.eye(2))
    np.testing.assert_allclose(p.values, [-1.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(np.abs(p.vectors), np.full((2, 2), np.sqrt(0.5)))
    with pytest.raises(ValueError, match="beta"):
        ritz_pairs(np.array([1.0, 2.0]), np.array([1.0, 2.0]), 0.0)
    with pytest.raises(ValueError, match="alpha"):
        tridiagonal_eigh(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="basis"):
        ritz_pairs(np.array([1.0, 2.0]), np.array([1.0]), 0.0, basis=np.eye(3))
    with pytest.raises(NumericalError):
        ritz_pairs(np.array([np.nan, 2.0]), np.array([1.0]), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"tol": float("nan")}, ValueError, "Argument 'tol': expected a finite number >= 0"),
        ({"tol": -1.0}, ValueError, "Argument 'tol': expected a finite number >= 0"),
        ({"tol": float("inf")}, ValueError, "Argument 'tol'"),
        ({"tol": "1e-8"}, TypeError, "Argument 'tol'"),
        ({"basis": np.ones(2)}, ValueError, "Argument 'basis': expected an n x 2 array"),
    ],
)
def test_ritz_pairs_refuses_bad_tol_and_basis(
    kwargs: dict[str, object], kind: type[Exception], match: str
) -> None:
    """``tol=nan`` or ``-1`` silently flagged every pair unconverged; a 1-D basis gave an
    IndexError."""
    with pytest.raises(kind, match=match):
        ritz_pairs(np.array([1.0, 2.0]), np.array([1.0]), 0.5, **kwargs)  # type: ignore[arg-type]


def test_lanczos_result_ritz_validates_tol() -> None:
    res = lanczos(np.diag(np.arange(1.0, 31.0)), 5, seed=0)
    with pytest.raises(ValueError, match="Argument 'tol'"):
        res.ritz(tol=float("nan"))
    assert res.ritz(tol=np.float32(1e-3)).converged.shape == (5,)

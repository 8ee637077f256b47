"""spectral.blockeig.block_eigenpairs on matrices with prescribed spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral.blockeig import block_eigenpairs
from spectral.errors import NumericalError
from spectral.synthetic import haar_orthogonal, prescribed_spectrum


class _Counting:
    def __init__(self, A: np.ndarray) -> None:
        self.A, self.shape, self.dtype, self.count = A, A.shape, A.dtype, 0

    def matvec(self, x: np.ndarray) -> np.ndarray:
        self.count += 1
        return self.A @ x

    def matmat(self, X: np.ndarray) -> np.ndarray:
        self.count += X.shape[1]
        return self.A @ X


def _spectrum(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[9.0, 7.0, 6.5, 3.0], rng.uniform(-1.0, 2.0, n - 4)])


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_values_and_residuals_against_the_prescribed_spectrum(which: str) -> None:
    ev = _spectrum(120, 0)
    ev[-1] = -12.0  # largest magnitude is negative
    A = prescribed_spectrum(ev, seed=1)
    r = block_eigenpairs(A, 3, which=which, tol=1e-10, seed=2)
    key = {"LA": -ev, "SA": ev, "LM": -np.abs(ev)}[which]
    want = ev[np.argsort(key, kind="stable")][:3]
    np.testing.assert_allclose(r.values, want, rtol=1e-10, atol=0)
    # the reported residuals are the true ones, and each met its threshold
    Y = r.vectors
    true = np.linalg.norm(A @ Y - Y * r.values, axis=0)
    np.testing.assert_allclose(r.residuals, true, rtol=1e-6, atol=1e-13)
    assert np.all(r.residuals <= r.thresholds)
    np.testing.assert_allclose(Y.T @ Y, np.eye(3), atol=1e-12)


def test_repeated_top_eigenvalue_is_found_twice() -> None:
    ev = np.r_[5.0, 5.0, 4.0, np.linspace(-1.0, 1.0, 57)]
    r = block_eigenpairs(prescribed_spectrum(ev, seed=3), 3, tol=1e-10, seed=0)
    np.testing.assert_allclose(r.values, [5.0, 5.0, 4.0], rtol=1e-10)


def test_warm_start_from_a_nearby_matrix_costs_fewer_products() -> None:
    n = 150
    A = prescribed_spectrum(_spectrum(n, 4), seed=5)
    cold_op = _Counting(A)
    first = block_eigenpairs(cold_op, 3, tol=1e-6, seed=0, keep=6)
    E = np.random.default_rng(6).standard_normal((n, n))
    B = A + 1e-3 * (E + E.T) / np.sqrt(n)
    warm_op, cold_op = _Counting(B), _Counting(B)
    warm = block_eigenpairs(warm_op, 3, start=first.subspace, tol=1e-6, seed=1)
    cold = block_eigenpairs(cold_op, 3, tol=1e-6, seed=1)
    want = np.sort(np.linalg.eigvalsh(B))[::-1][:3]
    np.testing.assert_allclose(warm.values, want, rtol=1e-6)
    np.testing.assert_allclose(cold.values, want, rtol=1e-6)
    assert warm.products == warm_op.count and cold.products == cold_op.count
    assert warm.products <= 0.6 * cold.products, (warm.products, cold.products)


def test_torch_stays_torch_and_matches_numpy() -> None:
    A = prescribed_spectrum(_spectrum(60, 7), seed=8)
    r = block_eigenpairs(torch.as_tensor(A), 2, tol=1e-10, seed=0)
    assert isinstance(r.vectors, torch.Tensor) and r.vectors.shape == (60, 2)
    np.testing.assert_allclose(r.values, [9.0, 7.0], rtol=1e-10)


def test_tiny_matrix_spanned_completely() -> None:
    Q = haar_orthogonal(4, seed=0)
    A = (Q * np.array([3.0, 2.0, 1.0, 1.0])) @ Q.T
    r = block_eigenpairs(A, 3, guard=1, tol=1e-12, seed=0)
    np.testing.assert_allclose(r.values, [3.0, 2.0, 1.0], rtol=1e-12)


def test_budget_and_bad_arguments() -> None:
    A = prescribed_spectrum(np.linspace(1.0, 1.001, 200), seed=0)
    with pytest.raises(NumericalError, match="max_products"):
        block_eigenpairs(A, 3, tol=1e-12, max_products=8, seed=0)
    with pytest.raises(ValueError, match="'k'"):
        block_eigenpairs(A, 0)
    with pytest.raises(ValueError, match="'which'"):
        block_eigenpairs(A, 1, which="BE")
    with pytest.raises(ValueError, match="'start'"):
        block_eigenpairs(A, 1, start=np.ones((3, 1)))
    with pytest.raises(ValueError, match="'keep'"):
        block_eigenpairs(A, 2, keep=1)


@pytest.mark.parametrize(("budget", "kind"), [(2.5, TypeError), (0, ValueError), (-3, ValueError)])
def test_max_products_must_be_a_positive_integer(budget: object, kind: type[Exception]) -> None:
    """2.5 gave "'float' object cannot be interpreted as an integer", 0 "the start block is
    empty" (a NumericalError blaming the block)."""
    with pytest.raises(kind, match="Argument 'max_products': expected None or a positive integer"):
        block_eigenpairs(np.diag(np.arange(1.0, 11.0)), 2, max_products=budget, seed=0)  # type: ignore[arg-type]


def test_numpy_float_tolerances_are_accepted() -> None:
    r = block_eigenpairs(np.diag(np.arange(1.0, 11.0)), 2, tol=np.float32(1e-6), seed=0)
    np.testing.assert_allclose(np.sort(r.values), [9.0, 10.0], rtol=1e-6)

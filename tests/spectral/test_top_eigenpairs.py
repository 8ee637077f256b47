"""Thick-restart Lanczos against scipy's eigsh (ARPACK) on numpy inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral import NumericalError, as_operator, top_eigenpairs
from tests.spectral.strategies import (
    rotate,
    rotated_matrices,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)


def _check_pairs(A: np.ndarray, vals: np.ndarray, vecs: np.ndarray, tol: float) -> None:
    assert np.all(np.diff(vals) >= 0)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(vals.size), atol=1e-10)
    resid = np.linalg.norm(A @ vecs - vecs * vals, axis=0)
    norm_a = np.max(np.abs(np.linalg.eigvalsh(A)))
    eps = np.finfo(np.float64).eps
    # the documented criterion (with a safety factor 10 for the true residual)
    threshold = np.maximum(
        tol * np.maximum(np.abs(vals), eps ** (2 / 3) * norm_a), 100 * eps * norm_a
    )
    assert np.all(resid <= 10 * threshold)


@settings(max_examples=10)
@given(
    data=rotated_matrices(min_n=40, max_n=100),
    k=st.integers(1, 4),
    which=st.sampled_from(["LA", "SA", "LM"]),
)
def test_agrees_with_eigsh(data: tuple[np.ndarray, np.ndarray], k: int, which: str) -> None:
    """Agreement with ARPACK and with the known spectrum.

    The strategy's clusters of width 1e-8 make some wanted eigenvalues nearly
    indistinguishable; a residual below ``tol |theta|`` then pins the value to
    ``1e-8`` only up to the cluster, hence ``tol = 1e-8`` and ``atol = 1e-7 ||A||``.
    """
    A, spectrum = data
    vals, vecs = top_eigenpairs(A, k, which=which, tol=1e-8, seed=0)
    scale = float(np.max(np.abs(spectrum)))
    key = {"LA": -spectrum, "SA": spectrum, "LM": -np.abs(spectrum)}[which]
    exact = np.sort(spectrum[np.argsort(key, kind="stable")[:k]])
    np.testing.assert_allclose(vals, exact, atol=1e-7 * scale)
    try:
        ref = np.sort(spla.eigsh(A, k, which=which, tol=1e-10, return_eigenvectors=False))
    except spla.ArpackNoConvergence:  # ARPACK too can stall inside a 1e-8 cluster
        ref = exact
    if np.allclose(ref, exact, rtol=0, atol=1e-7 * scale):
        # (ARPACK may miss a copy of an exactly repeated eigenvalue; we do not, see below)
        np.testing.assert_allclose(vals, ref, atol=1e-7 * scale)
    _check_pairs(A, vals, vecs, 1e-8)


def test_needs_restarts_and_converges_on_residual() -> None:
    rng = np.random.default_rng(0)
    spectrum = np.sort(np.r_[rng.uniform(0.0, 1.0, 395), [1.2, 1.25, 1.3, 1.35, 1.4]])
    A = rotate(spectrum, 1)
    vals, vecs = top_eigenpairs(A, 5, ncv=12, tol=1e-9, seed=0)
    np.testing.assert_allclose(vals, spectrum[-5:], rtol=1e-9)
    _check_pairs(A, vals, vecs, 1e-9)


def test_repeated_and_degenerate_eigenvalues() -> None:
    spectrum = np.r_[np.zeros(50), np.full(3, 2.0), [5.0]]
    A = rotate(spectrum, 3)
    vals, vecs = top_eigenpairs(A, 4, seed=1)
    np.testing.assert_allclose(vals, [2.0, 2.0, 2.0, 5.0], atol=1e-10)
    _check_pairs(A, vals, vecs, 1e-8)
    # a double top eigenvalue inside a spectrum of distinct values: one Krylov sequence
    # sees a single copy; the locked search on the complement finds the second one
    rng = np.random.default_rng(5)
    spectrum = np.sort(np.r_[rng.uniform(0.0, 0.99, 60), [1.0, 1.0]])
    A = rotate(spectrum, 6)
    vals, vecs = top_eigenpairs(A, 3, seed=0)
    np.testing.assert_allclose(vals, spectrum[-3:], atol=1e-10)
    _check_pairs(A, vals, vecs, 1e-8)
    # an operator with only two distinct eigenvalues: the Krylov space is invariant early
    vals, _ = top_eigenpairs(np.eye(30) * 3.0, 2, seed=0)
    np.testing.assert_allclose(vals, [3.0, 3.0])


def test_matrix_free_operator() -> None:
    d = np.linspace(-3.0, 2.0, 500)
    op = as_operator(lambda x: d * x, size=500)
    vals, vecs = top_eigenpairs(op, 2, which="LM", seed=0)
    np.testing.assert_allclose(vals, [-3.0, d[-2] if abs(d[-2]) > abs(d[1]) else d[1]])
    assert vecs.shape == (500, 2)


def test_no_convergence_raises_numerical_error() -> None:
    rng = np.random.default_rng(0)
    A = np.diag(np.sort(rng.uniform(0.0, 1.0, 300)))
    with pytest.raises(NumericalError, match="converged"):
        top_eigenpairs(A, 5, tol=1e-12, max_iters=1, ncv=8, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k": 0}, "k"),
        ({"k": 10}, "k"),
        ({"which": "BE"}, "which"),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"ncv": 2}, "ncv"),
        ({"ncv": 11}, "ncv"),
        ({"max_iters": 0}, "max_iters"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"k": 2, **kwargs}
    k = args.pop("k")
    with pytest.raises(ValueError, match=name):
        top_eigenpairs(np.eye(10), k, **args)  # type: ignore[arg-type]


def test_nan_product_raises() -> None:
    op = as_operator(lambda x: x * np.nan, size=20)
    with pytest.raises(NumericalError, match="NaN"):
        top_eigenpairs(op, 2, seed=0)


@settings(max_examples=60)
@given(
    n=st.integers(8, 40),
    rank=st.integers(1, 5),
    extra=st.integers(0, 1),
    which=st.sampled_from(["LA", "SA", "LM"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_low_rank_operators_in_factored_form(
    n: int, rank: int, extra: int, which: str, seed: int
) -> None:
    """``U diag(s) U^T`` applied in factored form: null vectors give products of pure noise.

    A regression test: the breakdown test compared the residual with the entries of
    the current column instead of the operator's norm, so the noise of a null vector
    (1e-29 next to eigenvalues of 50) was normalised into a Lanczos vector and Ritz
    values of 1e4-1e7 came out (21 % of such cases, silently).
    """
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, rank))
    s = rng.standard_normal(rank) * 10
    A = spla.LinearOperator((n, n), matvec=lambda x: U @ (s * (U.T @ x)), dtype=np.float64)
    dense = (U * s) @ U.T
    ev = np.linalg.eigvalsh(dense)
    k = min(rank + extra, n - 2)
    vals, vecs = top_eigenpairs(A, k, which=which, seed=seed)
    order = {"LA": np.argsort(-ev), "SA": np.argsort(ev), "LM": np.argsort(-np.abs(ev))}[which]
    norm_a = np.max(np.abs(ev))
    # the k-th wanted value may be one of several zeros or tie in |.|: compare sorted values
    want = np.sort(ev[order[:k]])
    if which == "LM":
        np.testing.assert_allclose(np.sort(np.abs(vals)), np.sort(np.abs(want)), atol=1e-7 * norm_a)
    else:
        np.testing.assert_allclose(vals, want, atol=1e-7 * norm_a)
    _check_pairs(dense, vals, vecs, 1e-8)


def test_numpy_float_tolerances_are_accepted() -> None:
    """``tol=np.float32(1e-6)`` was refused as not "a positive finite float"."""
    values, _ = top_eigenpairs(np.diag(np.arange(1.0, 11.0)), 2, tol=np.float32(1e-6), seed=0)
    np.testing.assert_allclose(values, [9.0, 10.0], rtol=1e-6)
    with pytest.raises(TypeError, match="Argument 'tol': expected a positive finite number"):
        top_eigenpairs(np.eye(10), 2, tol="1e-6")  # type: ignore[arg-type]

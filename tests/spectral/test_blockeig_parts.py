"""The parts of ``spectral.blockeig.block_eigenpairs``: limits, the Ritz step, the failure."""

from __future__ import annotations

import numpy as np
import pytest

from spectral.blockeig import _limits, _not_converged, _Ritz


def test_limits_defaults_and_bounds() -> None:
    assert _limits(100, 3, 4, None, None, None) == (24, 2000, 4)
    assert _limits(10, 3, 4, None, 50, 5) == (10, 50, 5)
    with pytest.raises(ValueError, match="max_basis"):
        _limits(100, 3, 4, 4, None, None)  # must exceed k + guard
    with pytest.raises(ValueError, match="keep"):
        _limits(100, 3, 4, None, None, 2)  # fewer than k


def test_ritz_step_on_an_invariant_basis_is_exact() -> None:
    A = np.diag([1.0, 2.0, 3.0, 4.0, 5.0])
    V = np.eye(5)[[4, 2, 0]]  # spans eigenvectors of 5, 3 and 1
    ritz = _Ritz.of(np, V, V @ A, 1, which="LA", width=2, tol=1e-8, eps=2.0**-52, anorm=0.0)
    assert ritz.theta[ritz.active].tolist() == [5.0, 3.0] and ritz.anorm == 5.0
    assert np.all(ritz.resid == 0.0) and bool(np.all(ritz.done))
    result = ritz.result(np, V, 2, 3, products=3, blocks=1)
    assert result.values.tolist() == [5.0, 3.0] and result.subspace.shape == (5, 3)
    assert np.array_equal(np.abs(result.vectors), np.eye(5)[:, [4, 2]])


def test_failure_names_the_converged_count_even_without_a_ritz_step() -> None:
    assert "0 of 2" in str(_not_converged(None, 2, 1e-8, 10))
    A = np.diag([1.0, 2.0, 3.0])
    V = np.array([[1.0, 1.0, 1.0]]) / np.sqrt(3.0)
    ritz = _Ritz.of(np, V, V @ A, 1, which="LA", width=1, tol=1e-8, eps=2.0**-52, anorm=0.0)
    message = str(_not_converged(ritz, 1, 1e-8, 10))
    assert "0 of 1" in message and "max_products=10" in message

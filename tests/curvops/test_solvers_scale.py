"""MINRES at any scale: solving (2^k A) x = b gives x / 2^k (the Givens floor is relative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvops import Dense, inverse


def _spd(n: int, scale: float, dtype: np.dtype) -> tuple[np.ndarray, Dense]:
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    M = Q @ np.diag(np.linspace(1.0, 10.0, n)) @ Q.T * scale
    M = (M + M.T) / 2
    return M, Dense(M.astype(dtype), symmetric=True)


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e-8), (np.float64, 1e-20)])
def test_minres_solves_operators_smaller_than_eps(dtype: np.dtype, scale: float) -> None:
    M, A = _spd(10, scale, dtype)
    b = np.random.default_rng(1).standard_normal(10).astype(dtype)
    Ainv = inverse(A, "minres", tol=1e-4)
    x = Ainv @ b
    ref = np.linalg.solve(M, b.astype(np.float64))
    assert Ainv.last_info.converged
    # kappa = 10: the error is at most kappa * tol (plus rounding)
    assert np.linalg.norm(x - ref) / np.linalg.norm(ref) <= 10 * 1e-4 + 100 * np.finfo(dtype).eps


@pytest.mark.parametrize(
    ("dtype", "powers"), [(torch.float32, (0, -40, -30, 30)), (torch.float64, (0, -70, -60, 60))]
)
def test_minres_is_scale_equivariant(dtype: torch.dtype, powers: tuple[int, ...]) -> None:
    """Exactly, within the exponent range where no square under- or overflows."""
    M, _ = _spd(8, 1.0, np.float64)
    M[0, 0] -= 6.0  # indefinite, nonsingular
    b = torch.as_tensor(np.random.default_rng(2).standard_normal((8, 2)), dtype=dtype)
    base = torch.as_tensor(M, dtype=dtype)
    solutions = {}
    for k in powers:  # powers of two scale exactly; the smallest norms are below eps
        Ainv = inverse(Dense(base * 2.0**k, symmetric=True), "minres", tol=1e-5)
        solutions[k] = torch.as_tensor(Ainv @ b) * 2.0**k
        assert Ainv.last_info.converged, k
    for k, x in solutions.items():
        torch.testing.assert_close(x, solutions[0], rtol=0, atol=0, msg=f"2^{k}")

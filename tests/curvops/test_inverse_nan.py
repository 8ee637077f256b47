"""NaN/Inf never turns into a number in inverse products (issue 19, item 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvops import Dense, inverse
from curvops.operator import CurvatureOperator
from spectral.errors import NumericalError

METHODS = ["cg", "minres", "lanczos"]


def spd(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    M = Q @ np.diag(np.geomspace(1.0, 10.0, n)) @ Q.T
    return 0.5 * (M + M.T)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_rhs_raises(method: str, bad: float, strict: bool) -> None:
    inv = inverse(Dense(spd(), symmetric=True, psd=True), method, tol=1e-12, strict=strict)
    b = np.ones(6)
    b[2] = bad
    with pytest.raises(NumericalError, match=r"right-hand side.*column\(s\) \[0\]"):
        inv @ b
    B = np.ones((6, 3))
    B[4, 1] = bad
    with pytest.raises(NumericalError, match=r"column\(s\) \[1\]"):
        inv @ torch.as_tensor(B)


class _NaNAfter(CurvatureOperator):
    """A psd diagonal whose products turn to NaN from the ``k``-th on."""

    def __init__(self, k: int) -> None:
        super().__init__(shape=(5, 5), torch_dtype=torch.float64, symmetric=True, psd=True)
        self.k, self.calls = k, 0
        self.d = torch.arange(1.0, 6.0, dtype=torch.float64)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.d[:, None] * X
        return out * float("nan") if self.calls >= self.k else out


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_product_during_solve_raises(method: str, strict: bool) -> None:
    A = _NaNAfter(2)
    inv = inverse(A, method, tol=1e-14, strict=strict)
    with pytest.raises(NumericalError, match="iteration 2"):
        inv @ np.ones(5)


@pytest.mark.parametrize("method", METHODS)
def test_finite_solve_unchanged(method: str) -> None:
    M = spd()
    x = inverse(Dense(M, symmetric=True, psd=True), method, tol=1e-13) @ np.arange(1.0, 7.0)
    np.testing.assert_allclose(M @ x, np.arange(1.0, 7.0), rtol=0, atol=1e-10)

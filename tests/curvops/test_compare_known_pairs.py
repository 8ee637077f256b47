"""compare_all reusing the exact operator's top eigenpairs a low-rank proxy was built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvops import Diagonal, compare_all
from curvops.operator import CurvatureOperator
from curvops.proxies import low_rank


class _Opaque(CurvatureOperator):
    """A symmetric matrix known only through products (no structure to read)."""

    def __init__(self, M: torch.Tensor) -> None:
        super().__init__(
            shape=tuple(M.shape), torch_dtype=M.dtype, device=M.device, symmetric=True, psd=True
        )
        self._M = M

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._M @ X

    def to_dense(self) -> torch.Tensor:
        return self._M.clone()


def _exact() -> _Opaque:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    values = np.concatenate([[9.0, 7.0, 5.0, 4.0], np.linspace(0.1, 1.0, 26)])
    return _Opaque(torch.as_tensor((Q * values) @ Q.T))


def test_known_pairs_give_the_same_report_for_fewer_products() -> None:
    A = _exact()
    L = low_rank(A, 6, seed=0)
    proxies = {"low": L, "diag": Diagonal(np.diag(A.to_dense().numpy()))}
    kw = {"k": 3, "num_iters": 12, "damping": 0.1, "gradient": np.ones(30), "seed": 0}
    plain = compare_all(proxies, A, **kw)  # type: ignore[arg-type]
    reused = compare_all(proxies, A, exact_pairs=(L.weights, L.factor), **kw)  # type: ignore[arg-type]
    for name in proxies:
        p, r = plain[name], reused[name]
        np.testing.assert_allclose(r.top_eigenvalue_errors, p.top_eigenvalue_errors, atol=1e-7)
        np.testing.assert_allclose(r.principal_angles, p.principal_angles, atol=1e-5)
        assert r.wasserstein == pytest.approx(p.wasserstein, rel=1e-12)
        assert r.products_exact < p.products_exact
    assert np.allclose(reused["low"].top_eigenvalue_errors, 0.0, atol=1e-10)


def test_known_pairs_are_checked() -> None:
    A = _exact()
    L = low_rank(A, 2, seed=0)
    with pytest.raises(ValueError, match="exact_pairs"):
        compare_all({"low": L}, A, k=3, exact_pairs=(L.weights, L.factor))
    with pytest.raises(ValueError, match="exact_pairs"):
        compare_all({"low": L}, A, k=1, exact_pairs=(L.weights, L.factor[:5]))

"""Symmetry checks that mean something in every dtype (sweep 6, finding 2).

The dense and sparse checks accepted ``max|A - A^T| <= max(sqrt(eps), 10 n eps) max|A|``:
at least ``max|A|`` for float16 from ``n = 103`` (bfloat16 from ``n = 13``), so an
upper-triangular matrix of ones ran through Lanczos.  ``check_symmetric`` accepted a
relative mismatch up to ``100 sqrt(n) eps``, at least 1 (its largest possible value) for
float16 from ``n = 100``.  Rounding-asymmetric products (``B @ B.T``, ``(Q Lambda) @ Q.T``
computed in 16 or 32 bits) must still pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse as sps
import torch
from scipy.sparse.linalg import aslinearoperator

import spectral
from tests.spectral.strategies import single_threaded_blas  # noqa: F401 (autouse fixture)

N = 300
SEEDS = range(20)
NUMPY = [np.float16, np.float32, np.float64]
TORCH = [torch.float16, torch.bfloat16, torch.float32]


def _factors(n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``B`` (Gaussian), ``Q Lambda`` and ``Q^T``: factors of two symmetric products."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return rng.standard_normal((n, n)) / np.sqrt(n), Q * rng.uniform(-1.0, 2.0, n), Q.T


def _numpy_products(dtype: type) -> list[np.ndarray]:
    B, QL, Qt = (f.astype(dtype) for f in _factors())
    return [B @ B.T, QL @ Qt]  # the second is asymmetric by rounding


def _torch_products(dtype: torch.dtype) -> list[torch.Tensor]:
    B, QL, Qt = (torch.tensor(f).to(dtype) for f in _factors())
    return [B @ B.T, QL @ Qt]


def _matrix_free(A: Any) -> Any:
    """``A`` behind a callable, so that only :func:`spectral.check_symmetric` can judge it."""
    if isinstance(A, np.ndarray):
        return aslinearoperator(A)
    return spectral.as_operator(lambda x: A @ x, size=N, like=torch.zeros(N, dtype=A.dtype))


@pytest.mark.parametrize("dtype", NUMPY)
def test_upper_triangular_numpy_matrix_is_refused(dtype: type) -> None:
    A = np.triu(np.ones((N, N))).astype(dtype)
    with pytest.raises(ValueError, match=r"Argument 'A': expected a symmetric matrix"):
        spectral.lanczos(A, 5, seed=0)


@pytest.mark.parametrize("dtype", TORCH)
def test_upper_triangular_torch_matrix_is_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=r"Argument 'A': expected a symmetric matrix"):
        spectral.as_operator(torch.triu(torch.ones(N, N, dtype=dtype)))


def test_upper_bidiagonal_sparse_float32_matrix_is_refused() -> None:
    """float32 reached ``10 n eps >= 1`` from ``n = 840,000``: a sparse size."""
    n = 2**20
    A = sps.diags([np.ones(n), np.ones(n - 1)], [0, 1], format="csr", dtype=np.float32)
    with pytest.raises(ValueError, match=r"Argument 'A': expected a symmetric matrix"):
        spectral.as_operator(A)


@pytest.mark.parametrize("dtype", NUMPY)
def test_rounded_symmetric_numpy_products_pass(dtype: type) -> None:
    for A in _numpy_products(dtype):
        spectral.as_operator(A)  # no error
        for seed in SEEDS:
            spectral.check_symmetric(_matrix_free(A), seed=seed)


@pytest.mark.parametrize("dtype", TORCH)
def test_rounded_symmetric_torch_products_pass(dtype: torch.dtype) -> None:
    products = _torch_products(dtype)
    if dtype != torch.float32:
        assert not torch.equal(products[1], products[1].T)  # rounding made it asymmetric
    for A in products:
        spectral.as_operator(A)
        for seed in SEEDS:
            spectral.check_symmetric(_matrix_free(A), seed=seed)


@pytest.mark.parametrize("dtype", [np.float16, torch.float16, torch.bfloat16])
def test_check_symmetric_refuses_an_upper_triangular_operator(dtype: Any) -> None:
    """The check is randomised (one pair of Gaussian vectors): a skew part is seen with high
    probability, not certainty; for this matrix the mismatch falls below the threshold with
    probability about 1 % (float16) and 10 % (bfloat16) per seed (measured over 300 seeds),
    so at least 10 refusals of 20 (fewer has binomial probability below 1e-6 in bfloat16);
    the old threshold (>= 1) refused none."""
    if isinstance(dtype, torch.dtype):
        A: Any = torch.triu(torch.ones(N, N, dtype=dtype))
    else:
        A = np.triu(np.ones((N, N))).astype(dtype)
    refused = 0
    for seed in SEEDS:
        try:
            spectral.check_symmetric(_matrix_free(A), seed=seed)
        except ValueError as error:
            assert "Argument 'A': expected a symmetric operator" in str(error)
            refused += 1
    assert refused >= 10

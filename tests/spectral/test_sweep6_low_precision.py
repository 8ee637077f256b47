"""Extreme eigenpairs of float16/bfloat16 operators (sweep 6, finding 1).

``top_eigenpairs`` and ``block_eigenpairs`` returned meaningless values for 16-bit
operators: the exact-breakdown test of thick-restart Lanczos, ``beta <= 10 sqrt(n) eps
||A||`` with the products' ``eps``, exceeded ``||A||`` (bfloat16 from ``n = 164``, float16
from ``n = 10,500``), so every step was replaced by a random vector; and the convergence
floor ``100 eps ||A||`` (0.78 ``||A||`` in bfloat16, 0.1 in float16) accepted the
Rayleigh-Ritz values of that random subspace (0.52 for a top eigenvalue of 1.05).

The bounds below follow from the error model of a 16-bit product run around float64
vectors: it rounds its input and its result (unit roundoff ``u = eps / 2`` each), so
``||f(x) - A x|| <= eps ||A|| ||x||`` (the diagonal and dense products here accumulate in
at least float32).  A pair is declared converged at a computed residual of at most the
floor ``2 eps ||A||``; the true residual ``||A y - theta y||`` (against the exactly
representable 16-bit matrix) adds the products' errors of the ``m <= 24`` basis vectors,
combined with the unit coefficient vector: at most ``sqrt(m) eps ||A||`` by
Cauchy-Schwarz.  Hence ``(2 + sqrt(24)) eps ||A||``, and an eigenvalue lies within the
true residual of ``theta``; the spectra have a gap of ``||A|| / 3`` at the top, far above
that bound, so that eigenvalue is the wanted one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spectral
from spectral.blockeig import block_eigenpairs
from tests.spectral.strategies import single_threaded_blas  # noqa: F401 (autouse fixture)

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _bound(dtype: torch.dtype, norm: float) -> float:
    return (2.0 + math.sqrt(24.0)) * EPS[dtype] * norm


def _diagonal_operator(n: int, dtype: torch.dtype) -> tuple[object, torch.Tensor]:
    """``diag(linspace(0, 1, n - 1), 1.5)`` in ``dtype`` as a matrix-free operator."""
    d = torch.tensor(np.r_[np.linspace(0.0, 1.0, n - 1), 1.5]).to(dtype)
    return spectral.as_operator(lambda x: d * x, size=n, like=torch.zeros(n, dtype=dtype)), d


def _true_residual(d: torch.Tensor, value: float, vector: torch.Tensor) -> float:
    y = vector.double()
    return float(torch.linalg.norm(d.double() * y - value * y) / torch.linalg.norm(y))


# n = 1500 breaks the old breakdown test in bfloat16 only, n = 20000 also in float16
@pytest.mark.parametrize(
    ("dtype", "n"), [(torch.bfloat16, 1500), (torch.float16, 1500), (torch.float16, 20000)]
)
def test_top_eigenpair_of_a_sixteen_bit_operator(dtype: torch.dtype, n: int) -> None:
    op, d = _diagonal_operator(n, dtype)
    top = float(d.double().max())  # 1.5, exact in both dtypes
    values, vectors = spectral.top_eigenpairs(op, 1, seed=0)
    bound = _bound(dtype, top)
    assert _true_residual(d, float(values[0]), vectors[:, 0]) <= bound
    assert abs(float(values[0]) - top) <= bound  # (the old code: 0.52 and 0.51)
    assert abs(spectral.lanczos(op, 40, seed=0).ritz().values[-1] - top) <= bound


@pytest.mark.parametrize(
    ("dtype", "n"), [(torch.bfloat16, 1500), (torch.float16, 1500), (torch.float16, 20000)]
)
def test_block_eigenpair_of_a_sixteen_bit_operator(dtype: torch.dtype, n: int) -> None:
    op, d = _diagonal_operator(n, dtype)
    top = float(d.double().max())
    result = block_eigenpairs(op, 1, seed=0)
    bound = _bound(dtype, top)
    assert np.all(result.residuals <= result.thresholds)
    assert np.all(result.thresholds <= 2.0 * EPS[dtype] * top * (1 + EPS[dtype]))  # the floor
    assert _true_residual(d, float(result.values[0]), result.vectors[:, 0]) <= bound
    assert abs(float(result.values[0]) - top) <= bound  # (the old code: 0.50 in bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_three_top_eigenvalues_of_a_dense_sixteen_bit_matrix(dtype: torch.dtype) -> None:
    """A dense 16-bit matrix (torch accumulates its products in float32) against
    ``eigvalsh`` of the same matrix in float64: eigenvalues 2, 2.5, 3 above a bulk in
    [-1, 1], gaps of 0.5 far above the bound (0.15 in bfloat16)."""
    rng = np.random.default_rng(0)
    n = 300
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.r_[rng.uniform(-1.0, 1.0, n - 3), [2.0, 2.5, 3.0]]) @ Q.T
    low = torch.tensor((A + A.T) / 2).to(dtype)
    exact = np.linalg.eigvalsh(low.double().numpy())
    bound = _bound(dtype, float(np.abs(exact).max()))
    values, _ = spectral.top_eigenpairs(low, 3, seed=1)
    np.testing.assert_allclose(values, exact[-3:], rtol=0, atol=bound)
    found = block_eigenpairs(low, 3, seed=1)
    np.testing.assert_allclose(np.sort(found.values), exact[-3:], rtol=0, atol=bound)


def test_low_rank_sixteen_bit_operator_continues_past_product_noise() -> None:
    """A rank-3 float16 operator: after three steps the Krylov space is invariant and the
    residual is product noise (about eps ||A||): the step continues with that direction
    (orthogonal to the basis in float64) instead of stopping, and the top values hold."""
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.standard_normal((200, 3)))
    low = torch.tensor((U * [1.0, 2.0, 4.0]) @ U.T).to(torch.float16)
    exact = np.linalg.eigvalsh(low.double().numpy())
    values, vectors = spectral.top_eigenpairs(low, 3, seed=0)
    np.testing.assert_allclose(values, exact[-3:], rtol=0, atol=_bound(torch.float16, 4.0))
    gram = (vectors.T @ vectors).numpy()
    np.testing.assert_allclose(gram, np.eye(3), rtol=0, atol=1e-12)  # float64 vectors


def test_float32_and_float64_floors_are_unchanged() -> None:
    from spectral.eigen import residual_floor

    for dtype in (np.float32, np.float64):
        op = spectral.as_operator(np.eye(4, dtype=dtype))
        assert residual_floor(op) == 100.0 * float(np.finfo(dtype).eps)
    half = spectral.as_operator(np.eye(4, dtype=np.float16))
    assert residual_floor(half) == 2.0 * 2.0**-10 <= 0.01

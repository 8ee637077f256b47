"""Scalars, empty right-hand sides and scipy operators as operands of curvops operators."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
from torch import nn

from curvops import Dense, FisherOperator, GGNOperator, HessianOperator, low_rank

M = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]])


@pytest.mark.parametrize(
    "scalar",
    [
        True,
        False,
        np.bool_(True),
        2j,
        np.complex128(1.0),
        torch.tensor(True),
        torch.tensor(1j),
        np.array(2j),
    ],
)
def test_boolean_and_complex_scalars_are_refused_on_either_side(scalar: object) -> None:
    A = Dense(M)
    for form in (lambda: scalar * A, lambda: A * scalar):
        with pytest.raises(TypeError, match=r"'other'.*real scalar"):
            form()


@pytest.mark.parametrize(
    "scalar",
    [
        torch.tensor(2.5),
        torch.tensor(2.5, dtype=torch.float32),
        np.array(2.5),
        np.float64(2.5),
        torch.tensor(3),
    ],
)
def test_zero_dimensional_arrays_scale_like_numbers(scalar: object) -> None:
    A = Dense(M, symmetric=True)
    c = float(scalar.item() if hasattr(scalar, "item") else scalar)  # type: ignore[attr-defined]
    for op in (scalar * A, A * scalar, A / scalar):
        assert op.shape == A.shape
    np.testing.assert_array_equal((scalar * A) @ np.eye(3), c * M)
    np.testing.assert_array_equal((A * scalar) @ np.eye(3), c * M)
    np.testing.assert_allclose((A / scalar) @ np.eye(3), M / c, rtol=1e-15)


def test_model_operators_multiply_empty_blocks_of_columns() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (6,), generator=g),
    )
    loss = nn.CrossEntropyLoss()
    for cls in (GGNOperator, HessianOperator, FisherOperator):
        A = cls(net, loss, data)
        n = A.shape[0]
        out = A @ np.zeros((n, 0))
        assert isinstance(out, np.ndarray) and out.shape == (n, 0)
        assert tuple(A.rmatmat(torch.zeros(n, 0, dtype=torch.float64)).shape) == (n, 0)


def test_sums_with_scipy_operators_use_scipys_generic_arithmetic() -> None:
    A = Dense(M, symmetric=True)
    other = np.arange(9.0).reshape(3, 3)
    L = sla.aslinearoperator(other)
    np.testing.assert_allclose((A + L) @ np.eye(3), M + other, rtol=1e-15)
    np.testing.assert_allclose((A - L) @ np.eye(3), M - other, rtol=1e-15)
    b = np.array([1.0, -2.0, 0.5])
    got = sla.expm_multiply(-0.1 * A, b, traceA=-0.1 * np.trace(M))
    np.testing.assert_allclose(got, scipy.linalg.expm(-0.1 * M) @ b, rtol=1e-12)
    with pytest.raises(TypeError, match=r"'other'.*shift"):
        A + 1.0


def test_low_rank_accepts_numpy_integers() -> None:
    A = Dense(np.diag([3.0, 2.0, 1.0]), symmetric=True)
    L = low_rank(A, np.int64(1), seed=0)
    np.testing.assert_allclose(L @ np.eye(3), np.diag([3.0, 0.0, 0.0]), atol=1e-12)
    with pytest.raises(ValueError, match="'k'"):
        low_rank(A, np.bool_(True))


def test_psd_claim_on_a_matrix_symmetric_only_to_rounding_names_the_symmetry() -> None:
    N = np.array([[2.0, 1.0 + 1e-15], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"'M'.*exactly symmetric.*symmetric=True"):
        Dense(N, psd=True)
    assert Dense(N, symmetric=True, psd=True).psd
    with pytest.raises(ValueError, match="'psd'"):
        Dense(N, symmetric=False, psd=True)

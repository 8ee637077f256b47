"""Structured operators (Identity, Diagonal, Dense, LowRank) against their dense matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvops import Dense, Diagonal, Identity, LowRank

RNG = np.random.default_rng(11)


def check_against(op, M: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    X = RNG.standard_normal((M.shape[1], 3))
    np.testing.assert_allclose(op @ X, M @ X, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(op.to_dense().numpy(), M, rtol=1e-13, atol=1e-13)
    u, v = RNG.standard_normal(M.shape[0]), RNG.standard_normal(M.shape[1])
    lhs, rhs = u @ (op @ v), v @ (op.T @ u)
    assert abs(lhs - rhs) <= 1e-12 * (1 + abs(lhs))


def test_identity() -> None:
    op = Identity(4)
    check_against(op, np.eye(4))
    assert op.symmetric and op.psd and op.dtype == np.float64
    assert Identity(3, dtype=torch.float32).dtype == np.float32
    with pytest.raises(ValueError, match="Argument 'n'"):
        Identity(-1)


def test_diagonal() -> None:
    d = np.array([3.0, -1.0, 0.5])
    op = Diagonal(d)
    check_against(op, np.diag(d))
    assert op.symmetric and not op.psd
    assert Diagonal([1.0, 0.0]).psd
    assert Diagonal(torch.ones(2, dtype=torch.float32)).dtype == np.float32
    assert Diagonal([1, 2]).dtype == np.float64  # integer input -> float64
    np.testing.assert_array_equal(op.diagonal.numpy(), d)
    with pytest.raises(ValueError, match="1-D"):
        Diagonal(np.ones((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        Diagonal([1.0, np.nan])


def test_dense_symmetry_detection_and_flags() -> None:
    A = RNG.standard_normal((5, 5))
    S = A + A.T
    assert Dense(S).symmetric and not Dense(S).psd
    assert not Dense(A).symmetric
    check_against(Dense(A), A)
    check_against(Dense(S), S)
    G = A @ A.T  # symmetric only up to rounding
    op = Dense(G, symmetric=True, psd=True)
    assert op.symmetric and op.psd
    np.testing.assert_array_equal(op.matrix.numpy(), op.matrix.numpy().T)
    with pytest.raises(ValueError, match="symmetric matrix"):
        Dense(A, symmetric=True)
    with pytest.raises(ValueError, match="psd matrix"):
        Dense(S - 20 * np.eye(5), psd=True)
    with pytest.raises(ValueError, match="non-symmetric"):
        Dense(A, psd=True)
    with pytest.raises(ValueError, match="2-D"):
        Dense(np.ones(3))


def test_dense_rectangular() -> None:
    A = RNG.standard_normal((3, 5))
    op = Dense(A)
    assert op.shape == (3, 5) and not op.symmetric
    check_against(op, A)
    with pytest.raises(ValueError, match="non-square"):
        Dense(A, symmetric=True)


def test_lowrank() -> None:
    U = RNG.standard_normal((6, 2))
    s = np.array([2.0, -0.5])
    op = LowRank(U, s)
    check_against(op, U @ np.diag(s) @ U.T)
    assert op.symmetric and not op.psd and op.rank == 2
    assert LowRank(U, np.abs(s)).psd
    with pytest.raises(ValueError, match="length 2"):
        LowRank(U, [1.0])


def test_constructors_copy_their_input() -> None:
    d = np.array([1.0, 2.0])
    op = Diagonal(d)
    d[0] = 100.0
    np.testing.assert_array_equal(op @ np.ones(2), [1.0, 2.0])
    t = torch.eye(2)
    dense = Dense(t)
    t[0, 0] = 5.0
    assert float(dense.to_dense()[0, 0]) == 1.0


def test_dtype_and_device_overrides() -> None:
    op = Dense(np.eye(2), dtype=np.float32, device="cpu")
    assert op.torch_dtype == torch.float32 and op.device == torch.device("cpu")

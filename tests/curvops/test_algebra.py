"""Operator algebra against dense matrices: combinators, folding, flags, affine tracking."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvops import (
    Adjoint,
    Affine,
    BlockDiagonal,
    CurvatureOperator,
    Dense,
    Diagonal,
    Identity,
    LowRank,
    Power,
    Product,
    Projected,
    Scaled,
    Sum,
)

N = 5


# ------------------------------------------------------------------ random expression trees
def leaf(kind: int, seed: int) -> tuple[CurvatureOperator, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, N))
    if kind == 0:
        S = (A + A.T) / 2
        return Dense(S), S
    if kind == 1:
        G = A @ A.T / N
        return Dense(G, symmetric=True, psd=True), (G + G.T) / 2
    if kind == 2:
        d = rng.standard_normal(N)
        return Diagonal(d), np.diag(d)
    if kind == 3:
        U = rng.standard_normal((N, 2))
        s = np.abs(rng.standard_normal(2))
        return LowRank(U, s), U @ np.diag(s) @ U.T
    if kind == 4:
        return Identity(N), np.eye(N)
    return Dense(A / 2), A / 2  # non-symmetric


@st.composite
def expressions(draw: Any, depth: int = 3) -> tuple[CurvatureOperator, np.ndarray]:
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return leaf(draw(st.integers(0, 5)), draw(st.integers(0, 2**16)))
    op, M = draw(expressions(depth=depth - 1))
    choice = draw(st.integers(0, 10))
    c = draw(st.sampled_from([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]))
    if choice in (0, 1):
        op2, M2 = draw(expressions(depth=depth - 1))
        return (op + op2, M + M2) if choice == 0 else (op - op2, M - M2)
    if choice == 2:
        return c * op, c * M
    if choice == 3:
        return -op, -M
    if choice == 4:
        op2, M2 = draw(expressions(depth=depth - 1))
        return op @ op2, M @ M2
    if choice == 5:
        return op @ op.T, M @ M.T
    if choice == 6:
        k = draw(st.integers(0, 3))
        return op**k, np.linalg.matrix_power(M, k)
    if choice == 7:
        return op.shift(c), M + c * np.eye(N)
    if choice == 8:
        return op.damp(abs(c)), M + abs(c) * np.eye(N)
    if choice == 9:
        return op / 4.0, M / 4.0
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    V, _ = np.linalg.qr(rng.standard_normal((N, draw(st.integers(1, 2)))))
    P = np.eye(N) - V @ V.T
    return op.deflate(V), P @ M @ P


@given(expressions())
def test_expression_matches_dense(expr: tuple[CurvatureOperator, np.ndarray]) -> None:
    op, M = expr
    assert op.shape == (N, N) and op.dtype == np.float64
    scale = 1.0 + np.linalg.norm(M)
    tol = 1e-12 * scale
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, 3))
    np.testing.assert_allclose(op @ X, M @ X, rtol=0, atol=tol * 10)
    # matvec vs matmat, numpy vs torch
    np.testing.assert_allclose(op @ X[:, 1], (op @ X)[:, 1], rtol=0, atol=tol)
    np.testing.assert_array_equal(op @ X, (op @ torch.from_numpy(X)).numpy())
    # dot test with the transpose
    u, v = rng.standard_normal(N), rng.standard_normal(N)
    assert abs(u @ (op @ v) - v @ (op.T @ u)) <= tol * 10
    np.testing.assert_allclose(op.T @ X, M.T @ X, rtol=0, atol=tol * 10)
    # flags are never wrong
    if op.symmetric:
        assert op.T is op
        np.testing.assert_allclose(M, M.T, rtol=0, atol=tol)
    if op.psd:
        assert op.symmetric
        assert np.linalg.eigvalsh((M + M.T) / 2).min() >= -tol
    # affine tracking: op == a * base + b * I
    a, b, base = op.affine_decomposition()
    assert not isinstance(base, Affine)
    np.testing.assert_allclose(a * base.to_dense().numpy() + b * np.eye(N), M, rtol=0, atol=tol)


# ------------------------------------------------------------------ folding rules
def sym(seed: int = 0, psd: bool = False) -> Dense:
    A = np.random.default_rng(seed).standard_normal((N, N))
    return Dense(A @ A.T, symmetric=True, psd=True) if psd else Dense(A + A.T)


def test_scalars_and_shifts_fold() -> None:
    A = sym()
    s = 3.0 * (2.0 * A)
    assert isinstance(s, Scaled) and s.base is A and s.a == 6.0
    neg = -A
    assert -neg is A
    assert A.shift(1.5).shift(-1.5) is A
    assert 1.0 * A is A and A.shift(0.0) is A
    aff = -(2.0 * A.shift(1.0) / 4.0)
    assert isinstance(aff, Affine) and aff.base is A
    assert aff.affine_decomposition()[:2] == (-0.5, -0.5)
    t = A + 2.0 * Identity(N)
    assert t.affine_decomposition() == (1.0, 2.0, A)
    t = Identity(N) + A
    assert t.affine_decomposition() == (1.0, 1.0, A)
    z = A - A
    assert isinstance(z, Scaled) and z.a == 0.0 and z.psd  # the zero matrix
    assert isinstance((2.0 * A) + A, Scaled)


def test_sum_and_product_flatten_and_powers_merge() -> None:
    A, B, C = sym(0), sym(1), sym(2)
    s = A + B + C
    assert isinstance(s, Sum) and len(s.terms) == 3
    p = A @ B @ C
    assert isinstance(p, Product) and len(p.factors) == 3
    assert isinstance(A @ A, Power) and (A @ A).exponent == 2
    assert ((A**2) @ A).exponent == 3  # type: ignore[attr-defined]
    assert ((A**2) ** 3).exponent == 6  # type: ignore[attr-defined]
    sc = (2.0 * A) ** 2
    assert isinstance(sc, Scaled) and sc.a == 4.0 and isinstance(sc.base, Power)
    assert isinstance(A**0, Identity) and A**1 is A
    assert A @ Identity(N) is A and Identity(N) @ A is A
    sp = (2.0 * A) @ (3.0 * B)
    assert isinstance(sp, Scaled) and sp.a == 6.0


def test_structure_flags() -> None:
    A, B = sym(0), sym(1)
    G, H = sym(2, psd=True), sym(3, psd=True)
    L = Dense(np.random.default_rng(4).standard_normal((N, 3)))
    assert (A + B).symmetric and not (A + B).psd
    assert (G + H).psd and not (G + A).psd
    assert (2.0 * G).psd and not (-2.0 * G).psd and (0.0 * A).psd
    assert not (A @ B).symmetric
    assert (A @ A).psd and (A**2).psd and not (A**3).psd and (G**3).psd
    assert (L @ L.T).psd and (L.T @ L).psd and (L @ L.T).shape == (N, N)
    assert (A @ G @ A).psd and (A @ B @ A).symmetric and not (A @ B @ A).psd
    assert not (A @ B @ G).symmetric
    assert G.damp(0.1).psd and not G.shift(-0.1).psd and G.shift(0.1).psd
    assert not A.damp(1.0).psd and A.damp(1.0).symmetric
    assert G.deflate(np.eye(N)[:, :1]).psd
    nonsym = Dense(np.triu(np.ones((N, N))))
    assert not (nonsym + A).symmetric
    assert isinstance(nonsym.T, Adjoint) and nonsym.T.T is nonsym
    # transposes of composites stay structured: (A + N)^T = A + N^T, (NA)^T = A N^T
    assert isinstance((nonsym + A).T, Sum) and isinstance((nonsym @ A).T, Product)
    assert isinstance((2.0 * nonsym).T, Scaled) and isinstance((nonsym**2).T, Power)


def test_damp_requires_non_negative() -> None:
    with pytest.raises(ValueError, match="delta"):
        sym().damp(-1e-3)
    with pytest.raises(ValueError, match="delta"):
        sym().damp(float("nan"))


def test_errors_on_incompatible_operands() -> None:
    A = sym()
    with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
        A + Identity(3)
    with pytest.raises(ValueError, match="rows"):
        A @ Dense(np.ones((3, 2)))
    with pytest.raises(ValueError, match="dtype float64"):
        A + Identity(N, dtype=torch.float32)

    class MetaOp(CurvatureOperator):
        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            return X

    meta = MetaOp(shape=(N, N), dtype=np.float64, device="meta", symmetric=True)
    with pytest.raises(ValueError, match="device"):
        A + meta
    with pytest.raises(TypeError, match="CurvatureOperator"):
        A @ sla.aslinearoperator(np.eye(N))
    with pytest.raises(ValueError, match="integer >= 0"):
        A**-1
    with pytest.raises(ValueError, match="integer >= 0"):
        A**1.5
    with pytest.raises(ValueError, match="square"):
        Dense(np.ones((2, 3))).shift(1.0)
    with pytest.raises(TypeError, match="scalar"):
        A * float("inf")


def test_deflation_removes_eigenvectors() -> None:
    G = sym(5, psd=True)
    M = G.to_dense().numpy()
    w, V = np.linalg.eigh(M)
    D = G.deflate(V[:, -2:])
    assert isinstance(D, Projected)
    top = sla.eigsh(D, k=1, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(top, w[-3], rtol=1e-10)
    np.testing.assert_allclose(D @ V[:, -1], np.zeros(N), atol=1e-12)
    np.testing.assert_array_equal(D.basis.numpy(), V[:, -2:])
    with pytest.raises(ValueError, match="orthonormal"):
        G.deflate(np.ones((N, 1)))
    with pytest.raises(ValueError, match="shape"):
        G.deflate(np.ones((N + 1, 1)))
    # a 1-D vector is one column; a loose tolerance can be given explicitly
    v = np.ones(N) / np.sqrt(N) * (1 + 1e-9)
    assert G.deflate(v, tol=1e-6).shape == (N, N)


def test_block_diagonal() -> None:
    A, G = sym(0), sym(1, psd=True)
    R = Dense(np.random.default_rng(2).standard_normal((2, 3)))
    B = BlockDiagonal([A, G])
    M = scipy.linalg.block_diag(A.to_dense().numpy(), G.to_dense().numpy())
    X = np.random.default_rng(3).standard_normal((2 * N, 2))
    np.testing.assert_allclose(B @ X, M @ X, rtol=1e-13)
    assert B.symmetric and not B.psd and B.offsets == (0, N, 2 * N)
    assert BlockDiagonal([G, G]).psd
    Bn = BlockDiagonal([A, R])
    Mn = scipy.linalg.block_diag(A.to_dense().numpy(), R.to_dense().numpy())
    assert Bn.shape == (N + 2, N + 3) and not Bn.symmetric
    np.testing.assert_allclose(Bn.to_dense().numpy(), Mn, rtol=1e-14)
    np.testing.assert_allclose(Bn.T.to_dense().numpy(), Mn.T, rtol=1e-14)
    assert isinstance(Bn.T, BlockDiagonal)
    with pytest.raises(ValueError, match="dtype"):
        BlockDiagonal([A, Identity(2, dtype=torch.float32)])


def lanczos_ritz(op: CurvatureOperator, v0: np.ndarray, m: int) -> np.ndarray:
    """Plain Lanczos with full reorthogonalisation (numpy), for the Theorem 1 check."""
    Q = [v0 / np.linalg.norm(v0)]
    alpha, beta = [], []
    for j in range(m):
        w = op @ Q[j]
        alpha.append(Q[j] @ w)
        Qm = np.stack(Q, axis=1)
        w = w - Qm @ (Qm.T @ w)
        w = w - Qm @ (Qm.T @ w)
        if j < m - 1:
            beta.append(np.linalg.norm(w))
            Q.append(w / beta[-1])
    return scipy.linalg.eigh_tridiagonal(np.array(alpha), np.array(beta), eigvals_only=True)


def test_theorem1_ritz_values_map_back() -> None:
    rng = np.random.default_rng(6)
    n = 30
    A = rng.standard_normal((n, n))
    H = Dense(A + A.T)
    mu = 7.5
    shifted = -H.shift(-mu)  # mu I - H
    v0 = rng.standard_normal(n)
    base_ritz = lanczos_ritz(H, v0, 8)
    mapped = np.sort(shifted.to_base_values(lanczos_ritz(shifted, v0, 8)))
    np.testing.assert_allclose(mapped, base_ritz, rtol=0, atol=1e-10 * np.abs(base_ritz).max())

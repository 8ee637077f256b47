"""Diagonal, per-layer block and low-rank proxies, and the exact structure queries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvops import (
    BlockDiagonal,
    FisherOperator,
    GGNOperator,
    diagonal_approximation,
    layer_blocks,
    low_rank,
)
from curvops.structure import exact_eigenvalues, exact_inverse, exact_logdet, exact_trace
from curvops.structured import Dense, Diagonal, Identity, LowRank
from curvops.testing import dense_ggn
from spectral.synthetic import prescribed_spectrum

DT = torch.float64


def _case() -> tuple[nn.Module, nn.Module, list]:
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(9, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (9,), generator=g)
    return net, nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])]


def test_exact_mc_and_empirical_diagonals_are_those_of_the_dense_matrices() -> None:
    net, loss_fn, data = _case()
    exact = diagonal_approximation(net, loss_fn, data, method="exact")
    torch.testing.assert_close(exact.diagonal, torch.diagonal(dense_ggn(net, loss_fn, data)))
    mc = diagonal_approximation(net, loss_fn, data, method="mc", mc_samples=3, seed=5)
    F = FisherOperator(net, loss_fn, data, kind="mc", mc_samples=3, seed=5).to_dense()
    torch.testing.assert_close(mc.diagonal, torch.diagonal(F), rtol=1e-12, atol=1e-15)
    emp = diagonal_approximation(net, loss_fn, data, method="empirical")
    E = FisherOperator(net, loss_fn, data, kind="empirical").to_dense()
    torch.testing.assert_close(emp.diagonal, torch.diagonal(E), rtol=1e-12, atol=1e-15)
    assert float((emp.diagonal - exact.diagonal).abs().max()) > 1e-4


def test_hutchinson_diagonal_is_within_its_standard_error() -> None:
    net, loss_fn, data = _case()
    M = 400
    est = diagonal_approximation(net, loss_fn, data, method="hutchinson", num_matvecs=M, seed=1)
    dense = dense_ggn(net, loss_fn, data)
    exact = torch.diagonal(dense)
    # Rademacher probes: Var(d_i) = sum_{j != i} a_ij^2 / M
    std = torch.sqrt(((dense**2).sum(1) - exact**2) / M)
    assert bool(((est.diagonal - exact).abs() <= 5 * std + 1e-15).all())
    assert float((est.diagonal - exact).abs().max()) > 0  # an estimate, not the exact values
    with pytest.raises(ValueError, match="method"):
        diagonal_approximation(net, loss_fn, data, method="kfac")


def test_layer_blocks_are_the_dense_diagonal_blocks() -> None:
    net, loss_fn, data = _case()
    B = layer_blocks(net, loss_fn, data)
    assert isinstance(B, BlockDiagonal) and len(B.blocks) == 2
    dense = dense_ggn(net, loss_fn, data)
    want = torch.zeros_like(dense)
    for lo, hi in ((0, 16), (16, 31)):
        want[lo:hi, lo:hi] = dense[lo:hi, lo:hi]
    torch.testing.assert_close(B @ torch.eye(31, dtype=DT), want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        exact_eigenvalues(B), torch.linalg.eigvalsh(want), atol=1e-12, rtol=0
    )


def test_low_rank_from_converged_top_eigenpairs_with_and_without_the_remainder() -> None:
    lam = np.array([10.0, 7.0, 5.0] + [0.5] * 17)
    A = prescribed_spectrum(lam, seed=3)
    op = Dense(A, symmetric=True)
    L = low_rank(op, 3, seed=0, tol=1e-12)
    assert isinstance(L, LowRank)
    w, V = np.linalg.eigh(A)
    top = V[:, -3:] @ np.diag(w[-3:]) @ V[:, -3:].T
    np.testing.assert_allclose(L @ np.eye(20), top, atol=1e-9)
    np.testing.assert_allclose(exact_eigenvalues(L).numpy()[-3:], [5.0, 7.0, 10.0], rtol=1e-10)
    R = low_rank(op, 3, remainder="exact", seed=0, tol=1e-12)
    dense_r = R @ np.eye(20)
    np.testing.assert_allclose(np.diag(dense_r), np.diag(A), atol=1e-10)
    np.testing.assert_allclose(dense_r - np.diag(np.diag(dense_r - top)), top, atol=1e-9)
    with pytest.raises(ValueError, match="remainder"):
        low_rank(op, 3, remainder="full")


def test_structure_queries_equal_the_dense_matrices() -> None:
    rng = np.random.default_rng(0)
    U = rng.standard_normal((6, 2))
    ops = {
        "lowrank": (LowRank(U, np.array([2.0, 0.5])), U @ np.diag([2.0, 0.5]) @ U.T),
        "diag": (Diagonal(np.array([1.0, 2.0, 4.0])), np.diag([1.0, 2.0, 4.0])),
        "identity": (Identity(3), np.eye(3)),
        "affine": (Diagonal(np.array([1.0, 3.0])).shift(2.0) * 0.5, np.diag([1.5, 2.5])),
        "blocks": (
            BlockDiagonal(
                [Diagonal(np.array([1.0, 2.0])), Dense(np.array([[2.0, 1.0], [1.0, 2.0]]))]
            ),
            np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 1.0], [0, 0, 1.0, 2.0]]),
        ),
    }
    for name, (op, M) in ops.items():
        w = np.linalg.eigvalsh(M)
        np.testing.assert_allclose(exact_eigenvalues(op).numpy(), w, atol=1e-12, err_msg=name)
        assert math.isclose(exact_trace(op), float(np.trace(M)), rel_tol=1e-12, abs_tol=1e-12)
        ld = exact_logdet(op)
        assert ld == -math.inf if w.min() <= 1e-12 else math.isclose(ld, np.sum(np.log(w)))
        inv = exact_inverse(op, 0.5)
        if inv is not None:
            np.testing.assert_allclose(inv @ (M + 0.5 * np.eye(len(M))), np.eye(len(M)), atol=1e-12)
    assert exact_eigenvalues(Dense(np.array([[0.0, 1.0], [2.0, 0.0]]))) is None
    net, loss_fn, data = _case()
    assert exact_eigenvalues(GGNOperator(net, loss_fn, data)) is None
    with pytest.raises(ValueError, match="damping"):
        exact_inverse(Diagonal(np.ones(2)), -1.0)


def test_exact_top_eigenpairs_are_eigenpairs_of_the_structured_operators() -> None:
    from curvops import KFACOperator
    from curvops.structure import exact_top_eigenpairs

    net, loss_fn, data = _case()
    rng = np.random.default_rng(1)
    U = rng.standard_normal((8, 3))
    ops = [
        KFACOperator(net, loss_fn, data, bias="joint"),
        KFACOperator(
            nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT),
            loss_fn,
            data,
            remainder="diagonal",
        ),
        LowRank(U, np.array([3.0, 2.0, 0.5])),
        BlockDiagonal([Diagonal(np.array([1.0, 5.0])), Dense(np.array([[2.0, 1.0], [1.0, 2.0]]))]),
        Dense(prescribed_spectrum(np.arange(1.0, 9.0), seed=0), symmetric=True),
    ]
    for op in ops:
        k = 3
        values, vectors = exact_top_eigenpairs(op, k)
        dense = op @ torch.eye(op.shape[0], dtype=DT)
        want = torch.linalg.eigvalsh(dense).flip(0)[:k]
        torch.testing.assert_close(values, want, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(dense @ vectors, vectors * values, rtol=0, atol=1e-12)
        torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=DT), rtol=0, atol=1e-12)
    assert exact_top_eigenpairs(LowRank(U, np.array([3.0, 2.0, 0.5])), 4) is None

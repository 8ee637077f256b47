"""Eigenvalues zero to working precision in curvops.structure: -inf log-dets, scale-free inverses.

An exactly singular matrix's computed eigenvalues are rounding noise (``eigvalsh`` of
:math:`BB^\\top` gives :math:`\\pm 10^{-16}`); their log is a number, not the ``-inf``
of a singular matrix.  Each structure's rounding floor (see
:func:`curvops.structure.exact_eigenvalues`) turns them into exact zeros, while a
legitimately positive-definite but ill-conditioned matrix keeps its finite log-det to
the first-order bound :math:`\\sum_i \\phi_i / \\lambda_i` (:math:`\\phi_i` the floor).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from curvops import Dense, Diagonal, LowRank
from curvops.algebra import BlockDiagonal
from curvops.structure import (
    exact_eigenvalues,
    exact_inverse,
    exact_logdet,
    exact_top_eigenpairs,
)
from spectral.synthetic import haar_orthogonal

EPS = float(np.finfo(np.float64).eps)


def _rank_deficient(n: int, rank: int, seed: int) -> np.ndarray:
    B = np.random.default_rng(seed).standard_normal((n, rank))
    return B @ B.T


@pytest.mark.parametrize("seed", range(8))
def test_exactly_singular_dense_has_logdet_minus_inf(seed: int) -> None:
    M = _rank_deficient(6, 5, seed)  # rank 5 of 6: eigvalsh returns a +-1e-16 for the zero
    op = Dense(M, symmetric=True)
    assert exact_logdet(op) == -math.inf
    values = exact_eigenvalues(op)
    assert values is not None
    assert int((values == 0).sum()) == 1
    # the nonzero ones are eigvalsh's, untouched
    assert torch.equal(values[1:], torch.linalg.eigvalsh(op.matrix)[1:])


def test_exactly_singular_low_rank_has_logdet_minus_inf() -> None:
    rng = np.random.default_rng(0)
    U = rng.standard_normal((4, 2)) @ rng.standard_normal((2, 5))  # 4 x 5, rank 2
    L = LowRank(U, np.ones(5))
    values = exact_eigenvalues(L)
    assert values is not None and values.numpy()[:2].tolist() == [0.0, 0.0]
    assert exact_logdet(L) == -math.inf
    # weights of both signs cancelling exactly: the zero operator
    cancel = LowRank(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([1.0, -1.0]))
    assert exact_eigenvalues(cancel).tolist() == [0.0, 0.0]  # type: ignore[union-attr]
    assert exact_top_eigenpairs(cancel, 1) is None  # only null space left
    assert exact_logdet(cancel) == -math.inf


def test_diagonal_entries_are_exact_a_zero_is_zero_a_tiny_entry_stays() -> None:
    assert exact_logdet(Diagonal(np.array([2.0, 0.0, 1.0]))) == -math.inf
    tiny = Diagonal(np.array([1.0, 1e-300]))
    assert exact_logdet(tiny) == math.log(1e-300)
    assert exact_eigenvalues(tiny).tolist() == [1e-300, 1.0]  # type: ignore[union-attr]


def test_blocks_and_affine_maps_keep_the_zeros() -> None:
    singular = Dense(_rank_deficient(5, 3, 2), symmetric=True)  # eigvalsh: two +1e-16 noises
    block = BlockDiagonal([Diagonal(np.array([1.0, 2.0])), singular])
    assert exact_logdet(block) == -math.inf
    doubled: Any = 2.0 * singular
    assert exact_logdet(doubled) == -math.inf
    # a shift makes it nonsingular: log(lambda + mu) with the zeros exactly mu
    mu = 1e-3
    shifted = exact_logdet(singular.shift(mu))
    lam = np.clip(np.linalg.eigvalsh(singular.matrix.numpy()), 0.0, None)
    lam[:2] = 0.0
    norm = float(np.abs(lam).max())
    tol = 2 * 5 * EPS * norm * float(np.sum(1.0 / (lam + mu)))
    assert shifted is not None and abs(shifted - float(np.sum(np.log(lam + mu)))) <= tol


def test_ill_conditioned_positive_definite_keeps_its_finite_logdet() -> None:
    n = 4
    lam = np.array([1e-10, 1e-5, 0.5, 1.0])
    Q = haar_orthogonal(n, seed=3)
    want = float(np.sum(np.log(lam)))
    # first-order error sum_i phi / lambda_i; phi: forming Q diag Q^T (2 n eps ||A||)
    # plus eigvalsh's n eps ||A|| for Dense, 2 (n + r) eps sigma for LowRank
    inv_sum = float(np.sum(1.0 / lam))
    dense = exact_logdet(Dense(Q @ np.diag(lam) @ Q.T, symmetric=True))
    assert dense is not None and abs(dense - want) <= 3 * n * EPS * 1.0 * inv_sum
    low = exact_logdet(LowRank(Q, lam))
    assert low is not None and abs(low - want) <= 2 * (n + n) * EPS * 1.0 * inv_sum
    # and their inverses exist (the eigenvalues are above the floors)
    assert exact_inverse(Dense(Q @ np.diag(lam) @ Q.T, symmetric=True), 0.0) is not None
    assert exact_inverse(LowRank(Q, lam), 0.0) is not None


def test_low_rank_inverse_floor_is_relative_to_the_operator_scale() -> None:
    for scale in (1e-14, 1.0, 1e14):
        L = LowRank(np.eye(3) * math.sqrt(scale), np.ones(3))  # scale * I
        x = exact_inverse(L, 0.0) @ np.ones(3)  # type: ignore[operator]
        np.testing.assert_allclose(x, np.full(3, 1.0 / scale), rtol=16 * 3 * EPS)
    # duplicated columns: rank 1 of 2 whatever the scale, refused naming A
    dup = LowRank(np.array([[1e-7, 1e-7], [0.0, 0.0]]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"'A'.*nonsingular"):
        exact_inverse(dup, 0.0)


def test_rank_zero_low_rank_damped_inverse_is_the_scaled_identity() -> None:
    L = LowRank(np.zeros((3, 0)), np.zeros(0))
    inv = exact_inverse(L, 2.0)
    assert inv is not None
    np.testing.assert_array_equal(inv @ np.eye(3), 0.5 * np.eye(3))
    with pytest.raises(ValueError, match="damping"):
        exact_inverse(L, 0.0)


@pytest.mark.parametrize("k", [1.0, True, "1", None])
def test_exact_top_eigenpairs_refuses_a_k_that_is_not_an_integer(k: object) -> None:
    with pytest.raises(TypeError, match="'k'"):
        exact_top_eigenpairs(Diagonal(np.array([1.0, 2.0])), k)  # type: ignore[arg-type]


def test_exact_top_eigenpairs_accepts_numpy_integers_and_zeroes_dense_noise() -> None:
    one: Any = np.int64(1)
    pairs = exact_top_eigenpairs(Diagonal(np.array([1.0, 2.0])), one)
    assert pairs is not None
    values, vectors = pairs
    assert values.tolist() == [2.0] and vectors[:, 0].tolist() == [0.0, 1.0]
    M = _rank_deficient(3, 1, 0)  # rank 1: two noise eigenvalues
    pairs = exact_top_eigenpairs(Dense(M, symmetric=True), 3)
    assert pairs is not None and pairs[0].tolist()[1:] == [0.0, 0.0]


def test_float32_dense_uses_float32_rounding() -> None:
    M = _rank_deficient(5, 3, 2).astype(np.float32)
    op = Dense(M, symmetric=True)
    values = exact_eigenvalues(op)
    assert values is not None and values.dtype == torch.float32
    assert int((values == 0).sum()) == 2
    assert exact_logdet(op) == -math.inf

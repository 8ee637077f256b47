"""compare() and exact_inverse on indefinite structured proxies (a Hessian's diagonal or blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import Dense, Diagonal, HessianOperator, compare, diagonal_of, layer_blocks
from curvops.structure import exact_inverse

EPS = float(np.finfo(np.float64).eps)


def _hessian() -> tuple[HessianOperator, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    data = (X, y)
    return HessianOperator(net, nn.CrossEntropyLoss(), data), net, data


@pytest.mark.parametrize("damping", [0.0, 0.25])
def test_indefinite_nonsingular_diagonal_and_dense_have_exact_inverses(damping: float) -> None:
    d = np.array([2.0, -1.5, 0.5, -3.0])
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    M = Q @ np.diag(d) @ Q.T
    for op, dense in [(Diagonal(d), np.diag(d)), (Dense(M, symmetric=True), M)]:
        inv = exact_inverse(op, damping)
        want = np.linalg.inv(dense + damping * np.eye(4))
        cond = np.linalg.cond(dense + damping * np.eye(4))
        np.testing.assert_allclose(
            inv @ np.eye(4), want, rtol=0, atol=100 * 4 * EPS * cond * np.abs(want).max()
        )
        assert inv.symmetric and not inv.psd


def test_exact_inverse_of_a_pd_dense_is_flagged_psd() -> None:
    assert exact_inverse(Dense(np.array([[2.0, 1.0], [1.0, 2.0]]), symmetric=True), 0.0).psd


def test_singular_to_working_precision_is_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"'A'.*nonsingular"):
        exact_inverse(Diagonal(np.array([1.0, 0.0])), 0.0)
    with pytest.raises(ValueError, match=r"'damping'.*nonsingular"):
        exact_inverse(Diagonal(np.array([1.0, -1.0])), 1.0)
    singular = np.array([[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"'A'.*nonsingular"):
        exact_inverse(Dense(singular, symmetric=True), 0.0)


def test_compare_grades_hessian_proxies_with_negative_entries_without_damping() -> None:
    H, net, data = _hessian()
    D = diagonal_of(H)
    assert bool((D.diagonal < 0).any())
    n = H.shape[0]
    for proxy in (D, layer_blocks(net, nn.CrossEntropyLoss(), data, operator_cls=HessianOperator)):
        report = compare(proxy, H, k=2, num_iters=10, seed=0)
        assert np.isfinite(report.newton_step_error)
        # the structured solve agrees with MINRES on the same matrix as an unstructured sum
        P = np.asarray(proxy @ np.eye(n))
        same = compare(
            Dense(P, symmetric=True) + Dense(np.zeros((n, n))), H, k=2, num_iters=10, seed=0
        )
        assert report.newton_step_error == pytest.approx(same.newton_step_error, rel=1e-6)
        assert report.damping == same.damping

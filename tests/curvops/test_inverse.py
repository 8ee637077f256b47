"""Inverse products (CG, MINRES, Lanczos in torch) against numpy.linalg.solve."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from curvops import Dense, Diagonal, InverseOperator, inverse
from spectral.errors import NumericalError

N = 40


def spd_matrix(seed: int = 0, cond: float = 1e3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return Q @ np.diag(np.geomspace(1.0, cond, N)) @ Q.T


def indefinite_matrix(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    ev = np.concatenate([-np.geomspace(0.1, 20.0, N // 2), np.geomspace(0.2, 50.0, N // 2)])
    return Q @ np.diag(ev) @ Q.T


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("method", ["cg", "minres", "lanczos"])
def test_spd_system(method: str) -> None:
    M = spd_matrix()
    A = Dense(M, symmetric=True, psd=True)
    B = np.random.default_rng(2).standard_normal((N, 3))
    inv = inverse(A, method, tol=1e-12)
    assert isinstance(inv, InverseOperator) and inv.symmetric and inv.psd
    X = inv @ B
    # forward error <= cond * tol (with slack)
    assert rel_err(X, np.linalg.solve(M, B)) <= 1e3 * 1e-12 * 50
    info = inv.last_info
    assert info is not None and info.converged and info.method == method
    assert info.residual <= 1e-12 and 1 <= info.iterations <= 10 * N
    assert len(info.column_iterations) == 3
    true_res = np.linalg.norm(M @ X - B, axis=0) / np.linalg.norm(B, axis=0)
    assert true_res.max() <= 1e-10


@pytest.mark.parametrize("method", ["minres", "lanczos"])
def test_indefinite_system(method: str) -> None:
    M = indefinite_matrix()
    A = Dense(M, symmetric=True)
    b = np.random.default_rng(3).standard_normal(N)
    x = inverse(A, method, tol=1e-12) @ b
    assert rel_err(x, np.linalg.solve(M, b)) <= 1e-8


def test_minres_on_shift_and_cg_on_damp() -> None:
    M = indefinite_matrix(4)
    H = Dense(M, symmetric=True)
    b = np.random.default_rng(5).standard_normal(N)
    x = inverse(H.shift(0.05), "minres", tol=1e-12) @ b
    assert rel_err(x, np.linalg.solve(M + 0.05 * np.eye(N), b)) <= 1e-8
    G = Dense(M @ M, symmetric=True, psd=True)
    x = inverse(G.damp(1e-2), "cg", tol=1e-10) @ b  # (1e-12 is below CG's floor here)
    assert rel_err(x, np.linalg.solve(M @ M + 1e-2 * np.eye(N), b)) <= 1e-7


def test_torch_path_and_float32() -> None:
    M = spd_matrix(6, cond=10.0)
    A = Dense(M, symmetric=True, psd=True, dtype=torch.float32)
    b = torch.ones(N)
    inv = inverse(A, "minres", tol=1e-5)
    x = inv @ b
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    ref = np.linalg.solve(M, np.ones(N))
    assert rel_err(x.double().numpy(), ref) <= 1e-4
    np.testing.assert_array_equal(x.numpy(), inv @ np.ones(N, dtype=np.float32))


def test_zero_rhs_and_exact_small_krylov_space() -> None:
    A = Diagonal([2.0, 2.0, 5.0])
    for method in ("cg", "minres", "lanczos"):
        inv = inverse(A, method, tol=1e-14)
        np.testing.assert_array_equal(inv @ np.zeros(3), np.zeros(3))
        assert inv.last_info is not None and inv.last_info.converged
        x = inv @ np.array([1.0, 1.0, 1.0])  # two distinct eigenvalues: 2 steps
        np.testing.assert_allclose(x, [0.5, 0.5, 0.2], rtol=1e-12)
        assert inv.last_info.iterations <= 2


def test_refusals() -> None:
    H = Dense(indefinite_matrix(), symmetric=True)
    with pytest.raises(ValueError, match="minres"):
        inverse(H, "cg")
    assert isinstance(inverse(H, "cg", assume_psd=True), InverseOperator)
    with pytest.raises(ValueError, match="symmetric"):
        inverse(Dense(np.triu(np.ones((3, 3)))), "minres")
    with pytest.raises(ValueError, match="method"):
        inverse(H, "gmres")
    with pytest.raises(ValueError, match="tol"):
        inverse(H, "minres", tol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        inverse(H, "minres", maxiter=0)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        inverse(np.eye(3))  # type: ignore[arg-type]


def test_non_convergence_raises_or_warns(caplog: pytest.LogCaptureFixture) -> None:
    A = Dense(spd_matrix(7), symmetric=True, psd=True)
    b = np.random.default_rng(8).standard_normal(N)
    inv = inverse(A, "cg", tol=1e-12, maxiter=3, strict=False)
    with caplog.at_level(logging.WARNING, logger="curvops.solvers"):
        inv @ b
    assert "did not converge" in caplog.text
    assert inv.last_info is not None and not inv.last_info.converged
    assert inv.last_info.iterations == 3
    for method in ("cg", "minres", "lanczos"):  # the default raises
        with pytest.raises(NumericalError, match="iteration 3"):
            inverse(A, method, tol=1e-12, maxiter=3) @ b


def test_singular_system_outside_the_range_raises_by_default() -> None:
    """G x = b with b outside range(G): every method's iterate grew to norm ~1e17 and was
    returned with a logged warning; now it is an error unless strict=False."""
    Q = np.linalg.qr(np.random.default_rng(3).standard_normal((N, N)))[0]
    M = Q @ np.diag([0.0, 0.0, *np.linspace(1.0, 4.0, N - 2)]) @ Q.T
    G = Dense((M + M.T) / 2, symmetric=True, psd=True)
    b = Q[:, 0] + Q[:, 5]  # a null-space component
    for method in ("cg", "minres", "lanczos"):
        with pytest.raises(NumericalError, match="did not converge"):
            inverse(G, method, tol=1e-10) @ b
    inside = Q[:, 5]  # in the range: the minimum-norm solution, as before
    x = inverse(G, "minres", tol=1e-12) @ inside
    np.testing.assert_allclose(x, np.linalg.pinv(M) @ inside, rtol=0, atol=1e-9)


def test_cg_stops_on_non_positive_curvature(caplog: pytest.LogCaptureFixture) -> None:
    inv = inverse(Diagonal([1.0, -1.0]), "cg", assume_psd=True, strict=False)
    with pytest.raises(NumericalError, match=r"did not converge.*non-positive curvature"):
        inverse(Diagonal([1.0, -1.0]), "cg", assume_psd=True) @ np.ones(2)
    with caplog.at_level(logging.WARNING, logger="curvops.solvers"):
        x = inv @ np.ones(2)  # p^T A p = 0 at the first step
    assert np.isfinite(x).all()
    assert inv.last_info is not None and not inv.last_info.converged
    assert "did not converge" in caplog.text


@pytest.mark.parametrize("method", ["cg", "minres", "lanczos"])
@pytest.mark.parametrize(
    ("dtype", "scales"),
    [
        (torch.float64, [1e-300, 1e-200, 1e-154, 1.0, 1e154, 1e200]),
        (torch.float32, [1e-30, 1e-20, 1e30]),
    ],
)
def test_the_solution_is_scale_equivariant(
    method: str, dtype: torch.dtype, scales: list[float]
) -> None:
    """Before: a right-hand side of 1e-200 (float64; 1e-23 in float32) gave x = 0 reported
    converged (its norm underflowed), 1e154 raised on NaN.  Columns are solved scaled by
    powers of two, which is exact: the scaled solutions agree to the solver's accuracy."""
    d = torch.tensor([2.0, 4.0, 8.0, 3.0], dtype=dtype)
    b = torch.tensor([1.0, 2.0, -3.0, 0.5], dtype=dtype)
    inv = inverse(Diagonal(d), method, tol=1e-6 if dtype == torch.float32 else 1e-10)
    expected = (b / d).double()
    for scale in scales:
        x = inv @ (scale * b)
        assert inv.last_info is not None and inv.last_info.converged
        assert rel_err((x.double() / scale).numpy(), expected.numpy()) <= 1e-5, scale
    if dtype == torch.float64:  # columns of very different scales in one block
        both = torch.stack([1e-200 * b, b], dim=1)
        X = inv @ both
        assert rel_err((X[:, 0] / 1e-200).numpy(), expected.numpy()) <= 1e-8
        assert rel_err(X[:, 1].numpy(), expected.numpy()) <= 1e-8


def test_inverse_composes() -> None:
    M = spd_matrix(9, cond=10.0)
    A = Dense(M, symmetric=True, psd=True)
    x = np.random.default_rng(10).standard_normal(N)
    round_trip = inverse(A, "cg", tol=1e-13) @ A
    np.testing.assert_allclose(round_trip @ x, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["cg", "minres", "lanczos"])
def test_reported_residuals_are_the_true_ones(method: str) -> None:
    """MINRES on a singular, inconsistent system reported a relative residual of 0.3
    while the true one was 3.5e14; every solver now reports ``||b - Ax|| / ||b||``."""
    from curvops import Dense

    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    eigenvalues = np.r_[np.zeros(12), np.linspace(0.5, 4.0, 18)]  # singular, PSD
    M = Q @ np.diag(eigenvalues) @ Q.T
    A = Dense((M + M.T) / 2, symmetric=True, psd=True)
    b = torch.tensor(rng.standard_normal(30))  # not in the range of A
    for op, solvable in ((A, False), (A.damp(1e-2), True)):
        inv = inverse(op, method=method, strict=False)  # the residual of a failed solve too
        x = inv @ b
        true = float(torch.linalg.vector_norm(b - op @ x) / torch.linalg.vector_norm(b))
        info = inv.last_info
        assert info.residual == pytest.approx(true, rel=1e-6, abs=1e-14)
        assert info.converged == solvable
        if solvable:
            assert true <= 1e-8
        else:
            assert true > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weights", [[5.0, 2.0, 0.5], [5.0, 2.0, -0.5]])
def test_exact_inverse_of_a_damped_low_rank_operator(dtype: torch.dtype, weights: list) -> None:
    """Woodbury in float64 (before: None, so comparisons ran CG, which on a float32
    rank-3 proxy could not reach tol=1e-8 and failed ``curvature compare``)."""
    from curvops import LowRank
    from curvops.structure import exact_inverse

    gen = torch.Generator().manual_seed(0)
    U = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    s = torch.tensor(weights, dtype=torch.float64)
    damping = 1.0
    dense = U @ torch.diag(s) @ U.T + damping * torch.eye(40, dtype=torch.float64)
    want = torch.linalg.inv(dense)
    inv = exact_inverse(LowRank(U.to(dtype), s.to(dtype)), damping)
    assert inv is not None and inv.symmetric
    got = (inv @ torch.eye(40, dtype=dtype)).double()
    eps = float(torch.finfo(dtype).eps)
    cond = float(torch.linalg.cond(dense))
    assert float((got - want).abs().max()) <= 100 * eps * cond * float(want.abs().max())
    with pytest.raises(ValueError, match=r"Argument 'damping'.*singular"):
        exact_inverse(LowRank(U.to(dtype), s.to(dtype)), 0.0)


def test_a_right_hand_side_overflowing_the_operators_dtype_is_named() -> None:
    inv = inverse(Diagonal(torch.tensor([2.0, 4.0], dtype=torch.float32)), "cg")
    with pytest.raises(NumericalError, match=r"operator's dtype, float32: entries beyond"):
        inv @ np.array([1e300, 1.0])


@pytest.mark.parametrize("method", ["cg", "minres", "lanczos"])
@pytest.mark.parametrize(
    ("dtype", "scales"), [(torch.float64, [1e-160, 1e160]), (torch.float32, [1e-25, 1e20])]
)
def test_operators_of_extreme_norm_are_solved(
    method: str, dtype: torch.dtype, scales: list[float]
) -> None:
    """Before: MINRES stopped on "overflow in the recurrence" and Lanczos did not converge
    for an operator of norm 1e160 (or 1e-160; 1e20 and 1e-25 in float32): the norms of
    their vectors were squared past the range.  A well-conditioned system solves at any
    representable scale to the solver's accuracy."""
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    A = Q @ np.diag([1.0, 1.5, 2.0, 2.5, 3.0, -2.0 if method != "cg" else 1.2]) @ Q.T
    b = rng.standard_normal(6)
    expected = np.linalg.solve(A, b)
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    for scale in scales:
        op = Dense(torch.tensor(scale * A, dtype=dtype), symmetric=True)
        x = inverse(op, method, tol=tol, assume_psd=method == "cg") @ torch.tensor(b, dtype=dtype)
        assert rel_err(x.double().numpy() * scale, expected) <= 1e3 * tol, (scale, method)

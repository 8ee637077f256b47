"""compare(): zeros against itself, closed forms on a rotated diagonal, model operators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from curvops import CurvatureOperator, GGNOperator, KFACOperator, compare, compare_all
from curvops.structured import Dense, Diagonal
from spectral.synthetic import haar_orthogonal

N = 24
LAMBDA = np.concatenate([[9.0, 6.0, 4.0], np.linspace(0.2, 1.5, N - 3)])


def _rotated() -> tuple[np.ndarray, np.ndarray]:
    Q = haar_orthogonal(N, seed=7)
    return Q, Q @ np.diag(LAMBDA) @ Q.T


def test_compare_with_itself_reports_zeros_for_a_structured_operator() -> None:
    _, A = _rotated()
    op = Dense(A, symmetric=True)
    g = np.random.default_rng(0).standard_normal(N)
    r = compare(op, op, k=3, gradient=g)
    assert r.spectrum_exact == r.spectrum_approximation == "exact"
    assert r.wasserstein == 0.0
    assert np.all(r.top_eigenvalue_errors == 0.0)
    assert np.all(r.principal_angles <= 1e-7)
    assert np.all(r.quadratic_form_errors == 0.0)
    assert r.gradient_quadratic_form_error == 0.0
    assert r.newton_step_error == 0.0
    assert r.trace_error == 0.0 and r.logdet_error == 0.0
    assert r.products_exact == r.products_approximation > 0


def _mlp_case() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return net, nn.CrossEntropyLoss(), (x, y)


def test_compare_with_itself_reports_zeros_for_a_model_operator() -> None:
    net, loss_fn, data = _mlp_case()
    G = GGNOperator(net, loss_fn, data)
    r = compare(G, G, k=3, num_iters=20, damping=1e-2)
    assert r.spectrum_exact == r.spectrum_approximation == "slq"
    assert r.wasserstein == 0.0
    assert np.all(r.top_eigenvalue_errors == 0.0)
    assert np.all(r.principal_angles <= 1e-7)
    assert np.all(r.quadratic_form_errors == 0.0)
    assert r.gradient_quadratic_form_error == 0.0  # the mean-loss gradient by default
    assert r.newton_step_error == 0.0
    assert r.trace_error == 0.0 and r.logdet_error == 0.0
    assert r.products_exact == r.products_approximation > 20


def test_diagonal_proxy_of_a_rotated_diagonal_gives_the_closed_forms() -> None:
    Q, A = _rotated()
    d = np.diag(A).copy()
    proxy, exact = Diagonal(d), Dense(A, symmetric=True)
    g = np.random.default_rng(1).standard_normal(N)
    k, delta, seed, m = 3, 0.05, 4, 5
    r = compare(proxy, exact, k=k, gradient=g, damping=delta, seed=seed, num_directions=m)
    # W1 between two uniform measures on n points: mean gap of the sorted values
    w1 = np.mean(np.abs(np.sort(d) - np.sort(LAMBDA)))
    assert math.isclose(r.wasserstein, w1, rel_tol=1e-12)
    top_d = np.sort(d)[::-1][:k]
    np.testing.assert_allclose(r.top_eigenvalues_exact, LAMBDA[:k], rtol=1e-10)
    np.testing.assert_allclose(r.top_eigenvalues_approximation, top_d, rtol=1e-10)
    np.testing.assert_allclose(
        r.top_eigenvalue_errors, np.abs(top_d - LAMBDA[:k]) / LAMBDA[:k], rtol=1e-8
    )
    # principal angles between span(Q[:, :k]) and the coordinate axes of the k largest d_i
    axes = np.eye(N)[:, np.argsort(d)[::-1][:k]]
    angles = np.sort(scipy.linalg.subspace_angles(Q[:, :k], axes))
    np.testing.assert_allclose(r.principal_angles, angles, rtol=1e-6, atol=1e-8)
    # quadratic forms on the same seeded directions
    V = torch.randn(
        N, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).numpy()
    qa, qe = np.einsum("im,i,im->m", V, d, V), np.einsum("im,ij,jm->m", V, A, V)
    np.testing.assert_allclose(r.quadratic_form_errors, np.abs(qa - qe) / np.abs(qe), rtol=1e-10)
    ga, ge = g @ (d * g), g @ A @ g
    assert math.isclose(r.gradient_quadratic_form_error, abs(ga - ge) / abs(ge), rel_tol=1e-10)
    xa, xe = g / (d + delta), np.linalg.solve(A + delta * np.eye(N), g)
    want = np.linalg.norm(xa - xe) / np.linalg.norm(xe)
    assert math.isclose(r.newton_step_error, want, rel_tol=1e-8)
    # the diagonal keeps the trace; the log-det is that of the diagonal
    assert r.trace_error <= 1e-14
    assert math.isclose(r.logdet_exact, float(np.sum(np.log(LAMBDA))), rel_tol=1e-12)
    assert math.isclose(r.logdet_approximation, float(np.sum(np.log(d))), rel_tol=1e-12)
    assert math.isclose(
        r.logdet_error, abs(np.sum(np.log(d)) - np.sum(np.log(LAMBDA))), rel_tol=1e-9
    )
    assert r.logdet_approximation >= r.logdet_exact  # Hadamard's inequality
    arrays = r.as_arrays()
    assert arrays["principal_angles"].shape == (k,) and arrays["spectrum_exact"].dtype.kind == "U"


def test_kfac_against_the_ggn_on_a_model() -> None:
    net, loss_fn, data = _mlp_case()
    G = GGNOperator(net, loss_fn, data)
    K = KFACOperator(net, loss_fn, data)
    r = compare(K, G, k=3, num_iters=30, damping=1e-2)
    assert r.spectrum_approximation == "exact" and r.spectrum_exact == "slq"
    dense_k, dense_g = K.to_dense(), G.to_dense()
    top_g = torch.linalg.eigvalsh(dense_g).numpy()[::-1][:3]
    top_k = torch.linalg.eigvalsh(dense_k).numpy()[::-1][:3]
    np.testing.assert_allclose(r.top_eigenvalues_exact, top_g, rtol=1e-5)
    np.testing.assert_allclose(r.top_eigenvalues_approximation, top_k, rtol=1e-5)
    assert math.isclose(r.trace_approximation, float(torch.trace(dense_k)), rel_tol=1e-12)
    assert r.products_approximation > 0 and r.products_exact > r.products_approximation / 2
    assert 0 < r.wasserstein < float(top_g[0])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": 0}, ValueError),
        ({"k": N}, ValueError),
        ({"damping": -1.0}, ValueError),
        ({"num_directions": 0}, ValueError),
        ({"gradient": np.ones(3)}, ValueError),
    ],
)
def test_bad_arguments(kwargs: dict, error: type) -> None:
    _, A = _rotated()
    op = Dense(A, symmetric=True)
    with pytest.raises(error):
        compare(op, op, **kwargs)
    with pytest.raises(TypeError):
        compare(A, op)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        compare(Diagonal(np.ones(3)), op)


def test_compare_all_measures_the_exact_side_once_and_equals_compare() -> None:
    _, A = _rotated()
    exact = Dense(A, symmetric=True)
    proxies = {"diag": Diagonal(np.diag(A).copy()), "self": exact}
    g = np.ones(N)
    reports = compare_all(proxies, exact, k=2, gradient=g, damping=0.1)
    single = compare(proxies["diag"], exact, k=2, gradient=g, damping=0.1)
    for field in ("wasserstein", "trace_error", "logdet_error", "newton_step_error"):
        assert getattr(reports["diag"], field) == getattr(single, field)
    np.testing.assert_array_equal(reports["diag"].principal_angles, single.principal_angles)
    assert reports["self"].wasserstein == 0.0
    assert reports["diag"].products_exact == reports["self"].products_exact
    # the spectra behind W1: exact eigenvalues with equal weights
    np.testing.assert_allclose(reports["diag"].spectrum_nodes_exact, np.sort(LAMBDA), rtol=1e-10)
    np.testing.assert_allclose(reports["diag"].spectrum_weights_exact, np.full(N, 1 / N))
    with pytest.raises(ValueError, match="approximations"):
        compare_all({}, exact)


class _Hidden(CurvatureOperator):
    """A dense matrix behind products only (no structure: spectrum and trace by SLQ)."""

    def __init__(self, A: np.ndarray) -> None:
        super().__init__(
            shape=A.shape, torch_dtype=torch.float64, device=torch.device("cpu"), symmetric=True
        )
        self._A = torch.as_tensor(A)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._A @ X


def test_trace_standard_errors_say_which_trace_is_estimated() -> None:
    # Dense's trace is exact (stderr 0); an operator without structure gets the SLQ
    # estimate n sum_i w_i theta_i per probe and the standard error over the probes.
    _, A = _rotated()
    exact, hidden = Dense(A, symmetric=True), _Hidden(A)
    r = compare(hidden, exact, k=1, num_iters=N, num_probes=6, seed=3)
    assert r.spectrum_exact == "exact" and r.spectrum_approximation == "slq"
    assert r.trace_exact_stderr == 0.0
    assert math.isfinite(r.trace_approximation_stderr) and r.trace_approximation_stderr > 0
    per_probe = r.trace_approximation_stderr * math.sqrt(6)  # sample std of the 6 estimates
    assert per_probe < float(LAMBDA.sum())  # a spread, not a blow-up
    swapped = compare(exact, hidden, k=1, num_iters=N, num_probes=6, seed=3)
    assert swapped.trace_exact_stderr == r.trace_approximation_stderr
    assert swapped.trace_approximation_stderr == 0.0
    one = compare(hidden, exact, k=1, num_iters=N, num_probes=1, seed=3)
    assert math.isnan(one.trace_approximation_stderr)


def test_a_known_exact_trace_replaces_the_estimate() -> None:
    _, A = _rotated()
    hidden = _Hidden(A)
    r = compare_all({"d": Diagonal(np.diag(A).copy())}, hidden, k=1, num_iters=8,
                    exact_trace=float(LAMBDA.sum()), seed=0)["d"]  # fmt: skip
    assert r.trace_exact == float(LAMBDA.sum()) and r.trace_exact_stderr == 0.0
    assert r.trace_error <= 1e-14  # the diagonal keeps the trace
    with pytest.raises(ValueError, match="exact_trace"):
        compare_all({"d": hidden}, hidden, k=1, num_iters=4, exact_trace=math.nan)

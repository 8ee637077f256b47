"""tr f(A) by stochastic Lanczos quadrature: log-det, tr exp, tr A^-1, Schatten norms."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg

from spectral import synthetic
from spectral.functions import schatten_norm, trace_function
from spectral.probes import random_probe

N = 40
SPD = np.linspace(0.5, 3.0, N)
INDEFINITE = np.linspace(-2.0, 3.0, N)


def _dense_f(A: np.ndarray, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    lam, U = np.linalg.eigh(A)
    return (U * f(lam)) @ U.T


@pytest.mark.parametrize(
    ("name", "f", "spectrum"),
    [
        ("log", np.log, SPD),
        ("inv", np.reciprocal, SPD),
        ("exp", np.exp, INDEFINITE),
        ("sqrt", np.sqrt, SPD),
        ("abs", np.abs, INDEFINITE),
    ],
)
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_full_krylov_space_gives_the_probe_quadratic_form(
    name: str, f: Callable[[np.ndarray], np.ndarray], spectrum: np.ndarray, probe: str
) -> None:
    # With m = n the quadrature is exact for every f: n * sum_i w_i f(theta_i) = n u^T f(A) u.
    A = synthetic.prescribed_spectrum(spectrum, seed=1)
    est = trace_function(A, name, num_iters=N, num_probes=1, probe=probe, seed=5)
    v = random_probe(N, probe, np.random.default_rng(5))
    u = v / np.linalg.norm(v)
    expected = N * float(u @ _dense_f(A, f) @ u)
    assert est.value == pytest.approx(expected, rel=1e-9)
    assert est.method == "slq" and est.num_matvecs <= N and np.isnan(est.stderr)


def test_log_determinant_of_an_spd_matrix() -> None:
    # Wishart with ratio 1/4: spectrum in [0.25, 2.25], condition ~ 9; m = 20 makes the
    # quadrature error negligible against the Monte Carlo error.
    A = synthetic.wishart(200, 800, seed=0)
    exact = np.linalg.slogdet(A)[1]
    est = trace_function(A, "log", num_iters=20, num_probes=30, seed=1)
    assert abs(est.value - exact) <= 5 * est.stderr
    # Rademacher: Var(v^T L v) = 2 (||L||_F^2 - sum L_ii^2) with L = log(A); 30 probes
    L = _dense_f(A, np.log)
    theory = np.sqrt(2 * (np.sum(L**2) - np.sum(np.diag(L) ** 2)) / 30)
    assert 0.6 * theory < est.stderr < 1.6 * theory
    assert est.num_matvecs == 600


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("exp", lambda A: np.trace(scipy.linalg.expm(A))),
        ("inv", lambda A: np.trace(np.linalg.inv(A))),
        ("sqrt", lambda A: np.sum(np.sqrt(np.linalg.eigvalsh(A)))),
    ],
)
def test_trace_functions_within_their_standard_error(
    name: str, reference: Callable[[np.ndarray], float]
) -> None:
    A = synthetic.prescribed_spectrum(np.linspace(0.2, 2.0, 150), seed=2)
    est = trace_function(A, name, num_iters=25, num_probes=20, seed=3)
    assert abs(est.value - reference(A)) <= 5 * est.stderr + 1e-8 * abs(reference(A))


def test_callable_f() -> None:
    A = np.diag([1.0, 2.0, 3.0, 4.0])
    est = trace_function(A, lambda x: x**2 + 1, num_iters=4, num_probes=3, seed=0)
    assert est.value == pytest.approx(34.0, rel=1e-12)  # Rademacher on a diagonal: exact
    assert est.stderr == pytest.approx(0.0, abs=1e-10)


def test_schatten_norms() -> None:
    A = synthetic.prescribed_spectrum(INDEFINITE, seed=4)
    lam = np.linalg.eigvalsh(A)
    # p = 2: |x|^2 is a polynomial, exact given the probe once m >= 2; with m = n every p
    # is exact given the probe, so compare with the probe's quadratic form.
    for p in (1.0, 2, 3.5):
        est = schatten_norm(A, p, num_iters=N, num_probes=1, seed=7)
        v = random_probe(N, "rademacher", np.random.default_rng(7))
        u = v / np.linalg.norm(v)
        form = N * float(u @ _dense_f(A, lambda x, p=p: np.abs(x) ** p) @ u)
        assert est.value == pytest.approx(form ** (1 / p), rel=1e-9)
    # statistically: nuclear norm of a PSD matrix is its trace
    psd = synthetic.prescribed_spectrum(SPD, seed=5)
    nuclear = schatten_norm(psd, 1, num_iters=3, num_probes=20, seed=0)
    assert abs(nuclear.value - SPD.sum()) <= 5 * nuclear.stderr
    frob = schatten_norm(A, 2, num_iters=3, num_probes=50, seed=0)
    assert abs(frob.value - np.sqrt(np.sum(lam**2))) <= 5 * frob.stderr
    with pytest.raises(ValueError, match="'p'"):
        schatten_norm(A, 0.5)


def test_log_of_an_indefinite_operator_is_refused() -> None:
    A = synthetic.prescribed_spectrum(INDEFINITE, seed=0)
    with pytest.raises(ValueError, match="positive definite"):
        trace_function(A, "log", num_iters=10, num_probes=1, seed=0)
    with pytest.raises(ValueError, match="positive definite"):
        trace_function(A, "inv", num_iters=10, num_probes=1, seed=0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        trace_function(A, "sqrt", num_iters=10, num_probes=1, seed=0)


def test_unknown_function_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'f'"):
        trace_function(np.eye(3), "log2")
    with pytest.raises(TypeError, match="'f'"):
        trace_function(np.eye(3), 3.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("f", [lambda x: x[:1], lambda x: 1.0, lambda x: np.ones((len(x), 2))])
def test_callables_of_the_wrong_shape_are_refused(f: Callable[[np.ndarray], object]) -> None:
    """A raw "shapes (3,) and (1,) not aligned" or "only 0-dimensional arrays can be
    converted" came from numpy before."""
    with pytest.raises(
        ValueError, match=r"Argument 'f': expected a vectorised function returning shape \(3,\)"
    ):
        trace_function(np.diag(np.arange(1.0, 11.0)), f, num_iters=3, num_probes=2, seed=0)  # type: ignore[arg-type]

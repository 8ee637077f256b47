"""Trace, diagonal and Frobenius-norm estimators: exactness, variance, unbiasedness, backends."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral import synthetic
from spectral.estimators import TraceEstimate, diagonal, frobenius_norm_squared, trace
from spectral.probes import random_probes

EPS = np.finfo(np.float64).eps


def _indefinite_spectrum(rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 3.0, rank) * rng.choice([-1.0, 1.0], rank)


@given(
    num_matvecs=st.integers(3, 45),
    seed=st.integers(0, 2**31),
    probe=st.sampled_from(["rademacher", "gaussian", "sphere"]),
    data=st.data(),
)
def test_hutchpp_is_exact_for_rank_at_most_a_third(
    num_matvecs: int, seed: int, probe: str, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, num_matvecs // 3))
    n = 80
    values = _indefinite_spectrum(rank, seed) if rank else None
    A = synthetic.low_rank(n, rank, seed=seed, eigenvalues=values)
    est = trace(A, method="hutch++", num_matvecs=num_matvecs, probe=probe, seed=seed + 1)
    scale = np.abs(values).sum() if rank else 1.0
    # rounding of QR and products: a few units of n * eps * sum |lambda|
    assert abs(est.value - np.trace(A)) <= 100 * n * EPS * scale
    assert est.stderr <= 100 * n * EPS * scale or np.isnan(est.stderr)
    assert est.num_matvecs == num_matvecs and est.method == "hutch++"


@given(
    num_matvecs=st.integers(4, 45),
    seed=st.integers(0, 2**31),
    probe=st.sampled_from(["rademacher", "gaussian", "sphere"]),
    data=st.data(),
)
def test_xtrace_is_exact_below_its_number_of_vectors(
    num_matvecs: int, seed: int, probe: str, data: st.DataObject
) -> None:
    num_vectors = num_matvecs // 2
    rank = data.draw(st.integers(0, num_vectors - 1))
    n = 80
    values = _indefinite_spectrum(rank, seed) if rank else None
    A = synthetic.low_rank(n, rank, seed=seed, eigenvalues=values)
    est = trace(A, method="xtrace", num_matvecs=num_matvecs, probe=probe, seed=seed + 1)
    scale = np.abs(values).sum() if rank else 1.0
    assert abs(est.value - np.trace(A)) <= 1000 * n * EPS * scale
    assert est.num_matvecs == 2 * num_vectors


@pytest.mark.parametrize(
    "spectrum",
    [
        np.random.default_rng(0).normal(size=60),
        np.logspace(0.0, -14.0, 60),  # ill-conditioned sketch: still inverted, no bias
    ],
)
def test_xtrace_equals_its_definition(spectrum: np.ndarray) -> None:
    # mean_i [tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i], Q_i = orth(A W_{-i})
    n, m = 60, 7
    A = synthetic.prescribed_spectrum(spectrum, seed=1)
    W = random_probes(n, m, "gaussian", np.random.default_rng(5))
    terms = []
    for i in range(m):
        Q, _ = np.linalg.qr(A @ np.delete(W, i, axis=1))
        P = np.eye(n) - Q @ Q.T
        terms.append(np.trace(Q.T @ A @ Q) + W[:, i] @ P @ A @ P @ W[:, i])
    est = trace(A, method="xtrace", num_matvecs=2 * m, probe="gaussian", seed=5)
    scale = np.abs(spectrum).sum()
    assert est.value == pytest.approx(np.mean(terms), abs=1e-12 * scale)
    assert est.stderr == pytest.approx(np.std(terms, ddof=1) / np.sqrt(m), abs=1e-12 * scale)


def _variance_bound(samples: np.ndarray, z: float = 5.0) -> float:
    """z standard errors of the sample variance, from the sample's fourth central moment."""
    centred = samples - samples.mean()
    m4 = np.mean(centred**4)
    s2 = np.var(samples, ddof=1)
    return z * np.sqrt(max(m4 - s2**2, 0.0) / samples.size)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_variance_matches_theory(probe: str) -> None:
    # Var(v^T A v) = 2 (||A||_F^2 - sum a_ii^2) for Rademacher, 2 ||A||_F^2 for Gaussian.
    n, N, seed = 40, 6000, 3
    A = synthetic.prescribed_spectrum(np.linspace(-1.0, 2.0, n), seed=2)
    theory = 2 * (np.sum(A**2) - (np.sum(np.diag(A) ** 2) if probe == "rademacher" else 0.0))
    V = random_probes(n, N, probe, np.random.default_rng(seed))
    samples = np.einsum("ij,ij->j", V, A @ V)
    est = trace(A, method="hutchinson", num_matvecs=N, probe=probe, seed=seed)
    assert est.value == pytest.approx(samples.mean(), rel=1e-12)
    # empirical variance within 5 of its standard errors (fourth-moment based) of theory
    assert abs(np.var(samples, ddof=1) - theory) <= _variance_bound(samples)
    # the reported stderr is the sample one: stderr^2 * N is the per-probe variance
    assert est.stderr**2 * N == pytest.approx(np.var(samples, ddof=1), rel=1e-10)
    # and the estimate is within 5 theoretical standard errors of the truth
    assert abs(est.value - np.trace(A)) <= 5 * np.sqrt(theory / N)


def test_hutchinson_is_exact_for_diagonal_matrices_with_rademacher() -> None:
    A = np.diag(np.arange(1.0, 21.0))
    est = trace(A, method="hutchinson", num_matvecs=5, seed=0)
    assert est.value == pytest.approx(210.0, rel=1e-14)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "slq"])
def test_estimators_are_unbiased(method: str) -> None:
    n = 50
    A = synthetic.prescribed_spectrum(np.linspace(-1.0, 3.0, n) ** 3, seed=8)
    estimates = np.array(
        [trace(A, method=method, num_matvecs=12, seed=s, num_iters=3).value for s in range(200)]
    )
    se = estimates.std(ddof=1) / np.sqrt(estimates.size)
    assert abs(estimates.mean() - np.trace(A)) <= 5 * se


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum() -> None:
    n = 200
    A = synthetic.prescribed_spectrum(1.0 / np.arange(1, n + 1) ** 2, seed=0)
    errors = {
        method: np.mean(
            [
                abs(trace(A, method=method, num_matvecs=60, seed=s).value - np.trace(A))
                for s in range(10)
            ]
        )
        for method in ("hutchinson", "hutch++", "xtrace")
    }
    assert errors["hutch++"] < 0.2 * errors["hutchinson"]
    assert errors["xtrace"] < 1.25 * errors["hutch++"]  # XTrace is at least as accurate


def test_slq_trace_and_stderr() -> None:
    A = np.diag(np.linspace(1.0, 2.0, 30))
    est = trace(A, method="slq", num_matvecs=20, num_iters=5, seed=0)
    assert est.value == pytest.approx(45.0, rel=1e-12)  # Rademacher on a diagonal
    assert est.num_matvecs == 20 and est.method == "slq"
    single = trace(A, method="slq", num_matvecs=5, num_iters=5, seed=0)
    assert np.isnan(single.stderr)


def test_slq_trace_keeps_to_its_budget() -> None:
    """``num_matvecs // num_iters`` probes: a budget below one probe is refused (it used
    ``num_iters`` products anyway, 10 for a budget of 5); ``num_iters`` is capped at ``n``."""
    A = np.diag(np.linspace(1.0, 2.0, 30))
    with pytest.raises(ValueError, match=r"Argument 'num_matvecs'.*num_iters = 10.*received 5"):
        trace(A, method="slq", num_matvecs=5, num_iters=10, seed=0)
    assert trace(A, method="slq", num_matvecs=29, num_iters=10, seed=0).num_matvecs == 20
    assert trace(A[:4, :4], method="slq", num_matvecs=5, num_iters=10, seed=0).num_matvecs == 4


def test_diagonal_exact_and_hutchinson() -> None:
    n = 40
    A = synthetic.prescribed_spectrum(np.linspace(-2.0, 2.0, n), seed=4)
    np.testing.assert_allclose(diagonal(A, method="exact"), np.diag(A), atol=1e-14)
    N = 2000
    d = diagonal(A, method="hutchinson", num_matvecs=N, seed=1)
    # Rademacher: Var(d_i) = sum_{j != i} a_ij^2 / N
    sd = np.sqrt((np.sum(A**2, axis=1) - np.diag(A) ** 2) / N)
    assert np.max(np.abs(d - np.diag(A)) / sd) < 5.0
    g = diagonal(A, method="hutchinson", num_matvecs=N, probe="gaussian", seed=1)
    assert np.max(np.abs(g - np.diag(A))) < 0.2


def test_frobenius_norm_squared() -> None:
    D = np.diag([1.0, -2.0, 3.0])
    assert frobenius_norm_squared(D, num_matvecs=4, seed=0).value == pytest.approx(14.0)
    n = 40
    A = synthetic.prescribed_spectrum(np.linspace(-1.0, 2.0, n), seed=5)
    est = frobenius_norm_squared(A, num_matvecs=3000, probe="gaussian", seed=0)
    exact = np.sum(A**2)
    assert abs(est.value - exact) <= 5 * est.stderr
    # Gaussian: Var ||A g||^2 = 2 ||A^2||_F^2
    assert est.stderr == pytest.approx(np.sqrt(2 * np.sum((A @ A) ** 2) / 3000), rel=0.15)


def test_backends_give_the_same_numbers() -> None:
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    n = 30
    A = synthetic.prescribed_spectrum(np.linspace(-1.0, 2.0, n), seed=3)
    for other in (torch.from_numpy(A), xps.asarray(A)):
        for method in ("hutchinson", "hutch++", "xtrace", "slq"):
            ref = trace(A, method=method, num_matvecs=12, seed=2)
            got = trace(other, method=method, num_matvecs=12, seed=2)
            assert got.value == pytest.approx(ref.value, rel=1e-12, abs=1e-12)
        d = diagonal(other, method="hutchinson", num_matvecs=7, seed=1)
        assert type(d) is type(other)
        np.testing.assert_allclose(
            np.asarray(d), diagonal(A, method="hutchinson", num_matvecs=7, seed=1), rtol=1e-12
        )
        exact = diagonal(other, method="exact")
        assert type(exact) is type(other)
        np.testing.assert_allclose(np.asarray(exact), np.diag(A), atol=1e-14)
    f32 = trace(torch.from_numpy(A).float(), method="hutch++", num_matvecs=90, seed=0)
    assert f32.value == pytest.approx(np.trace(A), abs=1e-4)


def test_exact_diagonal_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # the module of spectral.trace (the function), whose block size the test lowers
    trace_module = importlib.import_module("spectral.estimators")
    monkeypatch.setattr(trace_module, "_BLOCK_ENTRIES", 64)  # 64 / 20 -> blocks of 3 columns
    A = synthetic.prescribed_spectrum(np.arange(20.0), seed=0)
    np.testing.assert_allclose(diagonal(A, method="exact"), np.diag(A), atol=1e-13)
    est = trace(A, method="hutchinson", num_matvecs=10, seed=0)
    V = random_probes(20, 10, "rademacher", np.random.default_rng(0))
    # blocks draw the same Rademacher stream as one draw of all probes
    assert est.value == pytest.approx(np.mean(np.einsum("ij,ij->j", V, A @ V)), rel=1e-12)


def test_trace_estimate_is_a_frozen_record() -> None:
    est = TraceEstimate(1.0, 0.5, 3, "hutchinson")
    assert float(est) == 1.0 and est.interval(2.0) == (0.0, 2.0)
    with pytest.raises(AttributeError):
        est.value = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "lanczos"}, "method"),
        ({"probe": "uniform"}, "probe"),
        ({"num_matvecs": 0}, "num_matvecs"),
        ({"method": "hutch++", "num_matvecs": 2}, "num_matvecs"),
        ({"method": "xtrace", "num_matvecs": 3}, "num_matvecs"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        trace(np.eye(5), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        diagonal(np.eye(3), method="probing")

"""Certified bounds after an early Lanczos stop (a residual beta <= sqrt(eps)||A|| dropped).

Before, a probe that stopped early was read as an exact invariant subspace. Its Gauss rule
was taken for the measure, and a small residual hid O(1) mass at an eigenvalue a few beta
from the nodes. Examples: eigenvalues {1, 1 + 3e-8} had true F = 0.6975 and "certified"
[0.99999999, 1]; one outlier over a 1e-12 bulk had true F = 0.087 and bounds [0, 0].
The truth here comes from a dense eigendecomposition. It is compared within that
decomposition's own rounding (see :func:`truth_interval`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.sparse.linalg import LinearOperator

from spectral import slq, trace
from spectral.bounds import quadrature_cdf_bounds, quadrature_expectation_bounds
from spectral.estimators import TraceEstimate
from spectral.probes import random_probe

from .strategies import haar_orthogonal, single_threaded_blas  # noqa: F401

EPS = float(np.finfo(np.float64).eps)


def probe_cdf(lam: np.ndarray, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``sum_{lam_j <= x} w_j`` for ascending ``lam``."""
    cumulative = np.concatenate([[0.0], np.cumsum(w)])
    return cumulative[np.searchsorted(lam, x, side="right")]


def truth_interval(A: np.ndarray, v: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An interval around the true ``F_v(x)`` that holds despite ``eigh``'s own rounding.

    ``eigh`` is backward stable: its eigenvalues are within ``c = 32 n eps ||A||``, and
    its spectral projector at ``x`` moves by at most ``c / gap(x)`` (Davis–Kahan). Here
    ``gap(x)`` is the distance between the eigenvalues on either side of ``x``. A
    resolved cluster 1e-9 wide therefore leaves ``F`` uncertain at the 1e-5 level, far
    below the O(0.01–1) misses this file guards against.
    """
    lam, U = np.linalg.eigh(A)
    w = (U.T @ v) ** 2 / float(v @ v)
    c = 32.0 * A.shape[0] * EPS * max(float(np.max(np.abs(lam))), np.finfo(float).tiny)
    k = np.searchsorted(lam, x, side="right")
    below = lam[np.clip(k - 1, 0, lam.size - 1)]
    above = lam[np.clip(k, 0, lam.size - 1)]
    gap = np.where((k > 0) & (k < lam.size), above - below, np.inf)
    slack = 1e-12 + np.minimum(1.0, c / np.maximum(gap, np.finfo(float).tiny))
    return probe_cdf(lam, w, x - c) - slack, probe_cdf(lam, w, x + c) + slack


def assert_bounds_hold(A: np.ndarray, v: np.ndarray, m: int, extra: np.ndarray) -> None:
    density = slq(A, m, probes=v)
    nodes = density.nodes
    lam = np.linalg.eigvalsh(A)
    span = max(float(lam[-1] - lam[0]), float(np.max(np.abs(lam))), 1e-300)
    offsets = span * np.array([1e-12, 1e-10, 1e-8, 1e-6, 1e-4])
    xs = np.concatenate(
        [
            np.linspace(lam[0] - 0.1 * span, lam[-1] + 0.1 * span, 101),
            lam,
            (lam[:-1] + lam[1:]) / 2.0,
            nodes,
            (nodes[:, None] + offsets).ravel(),
            (nodes[:, None] - offsets).ravel(),
            extra,
        ]
    )
    lo_truth, hi_truth = truth_interval(A, v, xs)
    lower, upper = density.cdf_bounds(xs, probe=0)
    assert np.all(lower <= hi_truth), (
        bool(density.probe_invariant[0]),  # type: ignore[index]
        float(np.max(lower - hi_truth)),
    )
    assert np.all(lo_truth <= upper), (
        bool(density.probe_invariant[0]),  # type: ignore[index]
        float(np.max(lo_truth - upper)),
    )


# ---------------------------------------------------------------------- the reported cases
@pytest.mark.parametrize(("c", "gap"), [(0.1, 1e-7), (0.55, 3e-8)])
def test_two_close_eigenvalues_after_one_step(c: float, gap: float) -> None:
    lam = np.array([1.0, 1.0 + gap])
    v = np.array([np.sqrt(1.0 - c**2), c])
    density = slq(np.diag(lam), 2, probes=v)
    assert bool(density.probe_invariant[0])  # type: ignore[index]  # stopped after one step
    x = 1.0 + 0.9 * gap
    true = float(v[0] ** 2)  # only the eigenvalue 1 lies below x
    lower, upper = density.cdf_bounds(x, probe=0)
    assert lower <= true <= upper  # was [0.99999999, 1] against 0.99 and 0.6975
    # the same rule read as the measure: exact only for a zero residual (tol = 0)
    exact_lo, exact_hi = quadrature_cdf_bounds(
        density.probe_nodes[0, :1],  # type: ignore[index]
        [1.0],
        x,
        invariant=True,
    )
    assert exact_lo == pytest.approx(1.0) and exact_hi == 1.0


def test_expectation_bounds_after_an_early_stop() -> None:
    """The quantile bounds of an early-stopped rule (before: J_k = [θ_k - δ, θ_k + δ])."""
    c, gap = 0.55, 3e-8
    v = np.array([np.sqrt(1.0 - c**2), c])
    density = slq(np.diag([1.0, 1.0 + gap]), 2, probes=v)
    cut = 1.0 + 0.9 * gap

    def step(t: np.ndarray) -> np.ndarray:
        return (t <= cut).astype(np.float64)

    lo, hi = quadrature_expectation_bounds(
        density.probe_nodes[0, :1],  # type: ignore[index]
        [1.0],
        step,
        (1.0, 1.0 + gap),
        invariant=True,
        tol=float(density.probe_tolerance[0]),  # type: ignore[index]
    )
    assert lo <= 1.0 - c**2 <= hi  # was [1, 1] against 0.6975


def test_expectation_bounds_stay_tight_for_an_exact_stop() -> None:
    density = slq(np.diag([1.0, 2.0, 3.0, 4.0]), 4, seed=0)
    assert bool(density.probe_invariant[0])  # type: ignore[index]
    lam = np.array([1.0, 2.0, 3.0, 4.0])
    for f in (np.exp, np.sqrt, lambda t: (t > 2.5).astype(np.float64)):
        lo, hi = quadrature_expectation_bounds(
            density.probe_nodes[0],  # type: ignore[index]
            density.probe_weights[0],  # type: ignore[index]
            f,
            (1.0, 4.0),
            invariant=True,
            tol=float(density.probe_tolerance[0]),  # type: ignore[index]
        )
        true = float(np.mean(f(lam)))
        assert lo - 1e-12 <= true <= hi + 1e-12 and hi - lo < 1e-6


def test_outlier_over_a_tiny_bulk() -> None:
    """One eigenvalue 1 over four in [0, 1e-12]: stops at beta ~ 1e-13 with 3 steps."""
    worst = 0.0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        lam = np.sort(np.r_[1e-12 * rng.uniform(0.0, 1.0, 4), 1.0])
        Q = haar_orthogonal(5, rng)
        A = (Q * lam) @ Q.T
        A = (A + A.T) / 2.0
        exact, U = np.linalg.eigh(A)
        v = rng.choice([-1.0, 1.0], size=5)
        density = slq(A, 3, probes=v)
        truth = probe_cdf(exact, (U.T @ v) ** 2 / 5.0, exact)
        lower, upper = density.cdf_bounds(exact, probe=0)
        worst = max(worst, float(np.max(lower - truth)), float(np.max(truth - upper)))
    assert worst <= 1e-12  # was 0.087 (seed 7: bounds [0, 0] against F = 0.087)


def test_exact_breakdown_keeps_collapsed_bounds_away_from_the_nodes() -> None:
    """A residual at the rounding level still certifies F exactly beyond ~1e5 delta."""
    density = slq(np.diag([1.0, 2.0, 3.0, 4.0]), 4, seed=0)
    lower, upper = density.cdf_bounds(np.array([1.5, 2.5, 3.5, 1.0 + 1e-6]), probe=0)
    np.testing.assert_allclose(lower, [0.25, 0.5, 0.75, 0.25], atol=3e-10)
    np.testing.assert_allclose(upper, [0.25, 0.5, 0.75, 0.25], atol=3e-10)


def test_early_stop_bound_follows_the_residual() -> None:
    """|F - G| <= 2 (δ / (D - δ))^2 + w_j, intersected with the CMS bounds (w_j: how the
    mass splits between the nodes either side of x, δ / (gap - δ) by Davis–Kahan)."""
    theta, tau = [0.0, 1.0], [0.5, 0.5]
    xs = np.array([0.5, 0.01, 1e-3, -0.5])
    lower, upper = quadrature_cdf_bounds(
        theta, tau, xs, invariant=True, tol=1e-4, probability_tol=0.0
    )
    split = np.array([1e-4 / (1.0 - 1e-4)] * 3 + [0.0])  # w_1 for x in (0, 1), w_0 = 0
    slack = 2.0 * (1e-4 / (np.array([0.5, 0.01, 1e-3, 0.5]) - 1e-4)) ** 2 + split
    np.testing.assert_allclose(lower[:3], 0.5 - slack[:3], rtol=1e-12)
    np.testing.assert_allclose(upper[:3], 0.5 + slack[:3], rtol=1e-12)
    assert lower[3] == 0.0 and upper[3] == pytest.approx(slack[3], rel=1e-12)
    # within δ of a node: only the Chebyshev–Markov–Stieltjes bounds remain
    lower, upper = quadrature_cdf_bounds(theta, tau, 0.5e-4, invariant=True, tol=1e-4)
    assert lower == 0.0 and upper == 1.0


# ---------------------------------------------------------------------- property test
@st.composite
def early_stop_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, probe, m): Haar-rotated matrices whose Lanczos runs tend to stop early."""
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["clusters", "outlier", "repeated", "decay"]))
    scale = 10.0 ** draw(st.integers(-3, 3))
    if kind == "clusters":  # tight pairs and triples, relative gaps 1e-9 .. 1e-6
        centres = rng.uniform(-1.0, 1.0, n)
        gaps = 10.0 ** rng.uniform(-9.0, -6.0, n)
        lam = np.sort(np.concatenate([centres, centres + gaps, centres + 2 * gaps]))
        lam = lam[rng.permutation(lam.size)[:n]]
    elif kind == "outlier":  # a few outliers over a bulk of width 1e-12 .. 1e-6
        width = 10.0 ** rng.uniform(-12.0, -6.0)
        lam = width * rng.uniform(0.0, 1.0, n)
        outliers = min(n, draw(st.integers(1, 2)))
        lam[:outliers] = rng.uniform(0.5, 1.0, outliers)
    elif kind == "repeated":
        lam = rng.choice(rng.uniform(-1.0, 1.0, 3), size=n)
    else:  # exponential decay of a PSD spectrum
        lam = np.exp(-rng.uniform(0.0, 30.0, n))
    Q = haar_orthogonal(n, rng)
    A = (Q * (scale * lam)) @ Q.T
    A = (A + A.T) / 2.0
    v = random_probe(n, draw(st.sampled_from(["rademacher", "gaussian"])), rng)
    m = draw(st.integers(1, n))
    return A, v, m


@given(early_stop_cases())
def test_certified_cdf_bounds_contain_the_dense_truth(
    case: tuple[np.ndarray, np.ndarray, int],
) -> None:
    A, v, m = case
    assert_bounds_hold(A, v, m, np.linalg.eigvalsh(A))


# ---------------------------------------------------------------------- the minor findings
def test_support_from_eigvalsh_is_accepted() -> None:
    """A Ritz value 1 ulp outside eigvalsh's extremes is rounding, not a wrong support."""
    rng = np.random.default_rng(0)
    n = 20
    Q = haar_orthogonal(n, rng)
    A = (Q * np.linspace(-1.0, 3.0, n)) @ Q.T
    A = (A + A.T) / 2.0
    lam = np.linalg.eigvalsh(A)
    for seed in range(20):  # seed 8 has a node at -1.000000000000001 < -1.0000000000000009
        d = slq(A, 20, num_probes=2, seed=seed)
        lo, hi = d.trace_interval(support=(lam[0], lam[-1]))
        assert lo <= float(np.trace(A)) <= hi
        d.moment_interval(3, support=(lam[0], lam[-1]))
        d.expectation_interval(np.exp, support=(lam[0], lam[-1]))
    with pytest.raises(ValueError, match="support"):  # a node proves this one wrong
        d.trace_interval(support=(lam[0], 2.0))


def test_trace_interval_uses_student_t() -> None:
    est = TraceEstimate(0.0, 1.0, 4, "hutchinson", num_samples=4)
    assert est.interval()[1] == pytest.approx(3.182446305, rel=1e-8)  # t_3, 97.5%
    assert est.interval(confidence=0.9)[1] == pytest.approx(2.353363435, rel=1e-8)
    assert est.interval(2.0) == (-2.0, 2.0)  # an explicit quantile is kept
    assert TraceEstimate(0.0, 1.0, 4, "hutchinson").interval()[1] == pytest.approx(1.959964)
    with pytest.raises(ValueError, match="confidence"):
        est.interval(confidence=1.0)
    A = np.diag(np.arange(1.0, 41.0))
    for method, matvecs, terms in (("hutchinson", 9, 9), ("hutch++", 9, 3), ("slq", 40, 4)):
        got = trace(A, method=method, num_matvecs=matvecs, seed=0)
        assert got.num_samples == terms, method


def test_linear_operator_of_the_wrong_length_names_the_operator() -> None:
    bad = LinearOperator((30, 30), matvec=lambda x: np.ones(31), dtype=np.float64)
    with pytest.raises(ValueError, match=r"Argument 'A'.*30 entries"):
        slq(bad, 3, seed=0)
    with pytest.raises(ValueError, match=r"Argument 'A'.*30 entries"):
        trace(bad, num_matvecs=6, seed=0)

    def broken(x: np.ndarray) -> np.ndarray:
        raise ValueError("the user's own error")

    with pytest.raises(ValueError, match="the user's own error"):  # passed through
        slq(LinearOperator((3, 3), matvec=broken, dtype=np.float64), 2, seed=0)

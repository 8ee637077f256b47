"""Chebyshev-Markov-Stieltjes bounds of SLQ densities against the dense truth of each probe."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral import SpectralDensity, slq, synthetic
from spectral.bounds import PROBABILITY_TOL, quadrature_cdf_bounds
from spectral.probes import random_probe

from .strategies import haar_orthogonal, single_threaded_blas  # noqa: F401

# The dense truth's own rounding: partial sums of n squared overlaps (n <= 120).
TRUTH_TOL = 1e-13


def probe_cdf(lam: np.ndarray, U: np.ndarray, v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """F_v(x) = v^T 1[A <= x] v / ||v||^2 from an eigendecomposition A = U diag(lam) U^T."""
    order = np.argsort(lam, kind="stable")
    w = (U[:, order].T @ v) ** 2 / float(v @ v)
    cumulative = np.concatenate([[0.0], np.cumsum(w)])
    return cumulative[np.searchsorted(lam[order], x, side="right")]


def check_probe_bounds(
    A: np.ndarray, lam: np.ndarray, U: np.ndarray, m: int, V: np.ndarray
) -> None:
    density = slq(A, m, probes=V)
    span = lam.max() - lam.min() + 1.0
    grid = np.linspace(lam.min() - 0.1 * span, lam.max() + 0.1 * span, 1501)
    xs = np.concatenate([grid, lam, density.nodes])  # a fine grid, the eigenvalues, the nodes
    truths = []
    for k in range(V.shape[1]):
        truth = probe_cdf(lam, U, V[:, k], xs)
        lower, upper = density.cdf_bounds(xs, probe=k)
        assert np.all(lower <= truth + TRUTH_TOL), (k, float(np.max(lower - truth)))
        assert np.all(truth <= upper + TRUTH_TOL), (k, float(np.max(truth - upper)))
        truths.append(truth)
    lower, upper = density.cdf_bounds(xs)  # the probe average
    mean = np.mean(truths, axis=0)
    assert np.all(lower <= mean + TRUTH_TOL) and np.all(mean <= upper + TRUTH_TOL)


def rotated(lam: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    Q = haar_orthogonal(lam.size, rng)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2.0, Q


def family(
    name: str, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, eigenvalues, eigenvectors): dense truth for random families, exact for atoms."""
    if name == "atoms":  # repeated eigenvalues: 6 distinct values with multiplicities
        lam = np.repeat(
            [-1.0, 0.0, 0.5, 2.0, 3.0, 7.0], [n // 3, n // 6, n // 6, n // 6, n // 12, 0]
        )
        lam = np.concatenate([lam, np.full(n - lam.size, 7.0)])
        A, Q = rotated(lam, rng)
        return A, lam, Q
    if name == "wigner":
        A = synthetic.wigner(n, seed=rng)
    elif name == "wishart":  # ratio 2: an atom of half the mass at zero
        A = synthetic.wishart(n, n // 2, seed=rng)
    elif name == "low_rank_plus_noise":
        A = synthetic.low_rank(n, 5, seed=rng, eigenvalues=[5.0, 8.0, 12.0, 20.0, 40.0])
        A = A + 0.1 * synthetic.wigner(n, seed=rng)
    else:  # pragma: no cover
        raise AssertionError(name)
    lam, U = np.linalg.eigh(A)
    return A, lam, U


@pytest.mark.parametrize("name", ["wigner", "wishart", "low_rank_plus_noise", "atoms"])
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_bounds_hold_for_every_probe(name: str, probe: str) -> None:
    for seed in range(8):
        rng = np.random.default_rng([seed, 17])
        n = 120
        A, lam, U = family(name, n, rng)
        V = np.stack([random_probe(n, probe, rng) for _ in range(3)], axis=1)
        for m in (3, 10, 30):
            check_probe_bounds(A, lam, U, m, V)


def test_between_nodes_the_upper_bound_includes_the_next_node() -> None:
    # mu uniform on {0, 1, 2, 3}; its 2-point Gauss rule has nodes 1.5 -+ sqrt(1.25) with
    # weights 1/2. At x = 2 (between the nodes) F = 3/4 > 1/2 = the mass up to the node
    # below x: the upper bound must reach the next node (here 1).
    density = slq(np.diag([0.0, 1.0, 2.0, 3.0]), 2, probes=np.ones(4))
    np.testing.assert_allclose(density.nodes, 1.5 + np.sqrt(1.25) * np.array([-1.0, 1.0]))
    lower, upper = density.cdf_bounds(2.0)
    assert lower == pytest.approx(0.0, abs=2 * PROBABILITY_TOL)
    assert upper == pytest.approx(1.0) and upper >= 0.75
    lower, upper = density.cdf_bounds(3.0)  # beyond the last node
    assert lower == pytest.approx(0.5, abs=2 * PROBABILITY_TOL) and upper == 1.0


def test_bounds_close_at_the_number_of_distinct_eigenvalues() -> None:
    rng = np.random.default_rng(3)
    lam = np.repeat([0.0, 1.0, 2.5, 4.0], [40, 30, 20, 10])
    A, Q = rotated(lam, rng)
    v = random_probe(100, "rademacher", rng)
    xs = np.linspace(-1.0, 5.0, 601)
    xs = xs[np.min(np.abs(xs[:, None] - lam[None, :]), axis=1) > 1e-6]  # away from the atoms
    truth = probe_cdf(lam, Q, v, xs)
    gaps = []
    for m in (1, 2, 3, 4):
        density = slq(A, m, probes=v)
        lower, upper = density.cdf_bounds(xs, probe=0)
        assert np.all(lower <= truth + TRUTH_TOL) and np.all(truth <= upper + TRUTH_TOL)
        gaps.append(float(np.max(upper - lower)))
    assert density.probe_invariant is not None and bool(density.probe_invariant[0])
    assert gaps[-1] <= 2.5 * PROBABILITY_TOL  # invariant Krylov space: the bounds coincide
    assert min(gaps[:-1]) > 0.1  # before that they do not
    # m beyond the number of distinct eigenvalues stops early with the same exact rule
    assert bool(slq(A, 10, probes=v).probe_invariant[0])  # type: ignore[index]


def test_probe_average_and_explicit_probe_kind() -> None:
    A = synthetic.wigner(60, seed=0)
    V = np.random.default_rng(1).standard_normal((60, 4))
    density = slq(A, 8, probes=V)
    assert density.probe_kind == "explicit" and density.num_probes == 4
    lo, hi = density.cdf_bounds(np.array([-1.0, 0.0, 1.0]))
    per = [density.cdf_bounds(np.array([-1.0, 0.0, 1.0]), probe=k) for k in range(4)]
    np.testing.assert_allclose(lo, np.mean([p[0] for p in per], axis=0))
    np.testing.assert_allclose(hi, np.mean([p[1] for p in per], axis=0))
    with pytest.raises(ValueError, match="probe"):
        density.cdf_bounds(0.0, probe=4)


def test_bounds_refused_or_exact_for_other_densities() -> None:
    with pytest.raises(ValueError, match="not built by Gauss quadrature"):
        SpectralDensity([0.0, 1.0], [0.5, 0.5]).cdf_bounds(0.5)
    exact = SpectralDensity.from_eigenvalues([0.0, 1.0, 1.0, 3.0])
    lo, hi = exact.cdf_bounds(np.array([0.5, 1.0, 2.0]))
    assert lo.tolist() == hi.tolist() == [0.25, 0.75, 0.75]


def test_bounds_survive_save_and_load(tmp_path: object) -> None:
    import os

    density = slq(synthetic.wigner(50, seed=0), 6, num_probes=2, seed=0)
    path = os.path.join(str(tmp_path), "d.npz")
    density.save(path)
    again = SpectralDensity.load(path)
    assert again.source == "quadrature" and again.dimension == 50
    assert again.probe_kind == "rademacher"
    xs = np.linspace(-2.5, 2.5, 41)
    for a, b in zip(again.cdf_bounds(xs), density.cdf_bounds(xs)):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 10),
    data=st.data(),
)
def test_bounds_on_arbitrary_small_symmetric_matrices(n: int, data: st.DataObject) -> None:
    entries = st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False)
    M = np.array(data.draw(st.lists(entries, min_size=n * n, max_size=n * n))).reshape(n, n)
    A = (M + M.T) / 2.0
    v = np.array(data.draw(st.lists(entries, min_size=n, max_size=n)))
    if np.linalg.norm(v) < 1e-3:
        v = np.ones(n)
    m = data.draw(st.integers(1, n))
    lam, U = np.linalg.eigh(A)
    density = slq(A, m, probes=v)
    xs = np.concatenate([np.linspace(lam.min() - 1.0, lam.max() + 1.0, 201), lam, density.nodes])
    truth = probe_cdf(lam, U, v, xs)
    lower, upper = density.cdf_bounds(xs, probe=0)
    assert np.all(lower <= truth + TRUTH_TOL), float(np.max(lower - truth))
    assert np.all(truth <= upper + TRUTH_TOL), float(np.max(truth - upper))


def test_nan_points_give_nan_bounds_and_bands() -> None:
    """NaN in, NaN out, elementwise (cdf_bounds(NaN) was (0.877, 1.0), the band (0.39, 1.0))."""
    d = slq(np.diag(np.arange(1.0, 21.0)), 5, num_probes=2, seed=0)
    exact = SpectralDensity.from_eigenvalues(np.arange(1.0, 21.0))
    xs = np.array([[np.nan, 3.0], [10.5, np.nan]])
    nan = np.isnan(xs)
    for lo, hi in (
        d.cdf_bounds(xs),
        d.cdf_bounds(xs, probe=1),
        d.cdf_band(xs),
        d.cdf_band(xs, simultaneous=True),
        exact.cdf_bounds(xs),
        exact.cdf_band(xs),
        quadrature_cdf_bounds([1.0, 2.0], [0.5, 0.5], xs),
        quadrature_cdf_bounds([1.0, 2.0], [0.5, 0.5], xs, invariant=True),
    ):
        np.testing.assert_array_equal(np.isnan(lo), nan)
        np.testing.assert_array_equal(np.isnan(hi), nan)
        assert np.all(lo[~nan] <= hi[~nan])
    lo, hi = d.cdf_bounds(np.nan)
    assert np.isnan(lo) and np.isnan(hi)
    lo, hi = d.cdf_band(np.nan)
    assert np.isnan(lo) and np.isnan(hi)


def test_quadrature_cdf_bounds_validates() -> None:
    with pytest.raises(ValueError, match="tol"):
        quadrature_cdf_bounds([0.0], [1.0], 0.0, tol=-1.0)
    with pytest.raises(ValueError, match="weights"):
        quadrature_cdf_bounds([0.0, 1.0], [1.0], 0.0)


def test_bounds_hold_for_float32_operators() -> None:
    # Nodes and weights are then accurate to ~ (m + sqrt n) float32 epsilons: the widening
    # follows the operator's dtype (the float64 widening alone was violated by 5e-8 here).
    torch = pytest.importorskip("torch")
    for seed in range(6):
        rng = np.random.default_rng([seed, 32])
        n = 150
        A, lam, U = family("wigner" if seed % 2 else "atoms", n, rng)
        V = np.stack([random_probe(n, "rademacher", rng) for _ in range(2)], axis=1)
        xs = np.concatenate([np.linspace(lam.min() - 0.5, lam.max() + 0.5, 1001), lam])
        for m in (3, 10, 30, 60):
            d = slq(torch.from_numpy(A).float(), m, probes=torch.from_numpy(V).float())
            for k in range(2):
                truth = probe_cdf(lam, U, V[:, k], xs)
                lower, upper = d.cdf_bounds(xs, probe=k)
                assert np.all(lower <= truth + TRUTH_TOL) and np.all(truth <= upper + TRUTH_TOL)

"""Confidence bands and intervals of SLQ densities: coverage over seeds, width, validation."""

from __future__ import annotations

import logging
from typing import Any

import array_api_strict
import numpy as np
import pytest
import scipy.sparse
import torch

from spectral import SpectralDensity, slq, synthetic
from spectral.bounds import (
    chebyshev_halfwidth,
    probe_variance_factor,
    quadrature_expectation_bounds,
    wilson_chebyshev,
)
from spectral.probes import random_probe

from .strategies import haar_orthogonal, single_threaded_blas  # noqa: F401

logger = logging.getLogger(__name__)

NUM_SEEDS = 60


def binomial_limit(alpha: float, trials: int) -> float:
    """Largest miss rate compatible with a true rate <= alpha: alpha + 3 binomial sd."""
    return alpha + 3.0 * np.sqrt(alpha * (1.0 - alpha) / trials)


@pytest.fixture(scope="module")
def known_spectrum() -> tuple[np.ndarray, np.ndarray]:
    # A bulk (semicircle quantiles), an atom and two outliers, under a fixed Haar rotation.
    n = 300
    bulk = 2.0 * np.sin(np.pi * (np.arange(n - 62) + 0.5) / (n - 62) - np.pi / 2)
    lam = np.sort(np.concatenate([bulk, np.full(60, 0.7), [5.0, 9.0]]))
    Q = haar_orthogonal(n, np.random.default_rng(11))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2.0, lam


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("confidence", [0.8, 0.95])
def test_band_coverage_over_seeds(
    known_spectrum: tuple[np.ndarray, np.ndarray], probe: str, confidence: float
) -> None:
    A, lam = known_spectrum
    n = lam.size
    xs = np.array([-1.5, -0.5, 0.0, 0.69, 0.7, 1.2, 1.9])
    truth = np.searchsorted(lam, xs, side="right") / n
    band_misses = np.zeros(xs.size)
    naive_misses = np.zeros(xs.size)
    simultaneous_misses = 0
    for seed in range(NUM_SEEDS):
        density = slq(A, 40, num_probes=2, probe=probe, seed=seed)
        lo, hi = density.cdf_band(xs, confidence)
        band_misses += (truth < lo) | (truth > hi)
        qlo, qhi = density.cdf_bounds(xs)  # quadrature only, no probe fluctuation
        naive_misses += (truth < qlo) | (truth > qhi)
        slo, shi = density.cdf_band(xs, confidence, simultaneous=True)
        simultaneous_misses += bool(np.any((truth < slo) | (truth > shi)))
    alpha = 1.0 - confidence
    limit = binomial_limit(alpha, NUM_SEEDS)
    assert np.all(band_misses / NUM_SEEDS <= limit), band_misses
    assert simultaneous_misses / NUM_SEEDS <= limit
    # The test has power: ignoring the probe fluctuation misses far more often.
    assert naive_misses.max() / NUM_SEEDS > limit


def test_band_width_at_n2000_m60_p10() -> None:
    # A sparse symmetric random matrix (semicircle-like bulk) keeps the products cheap.
    n = 2000
    rng = np.random.default_rng(0)
    S = scipy.sparse.random(n, n, density=0.01, random_state=rng, data_rvs=rng.standard_normal)
    A = ((S + S.T) / np.sqrt(2.0 * 0.01 * n)).tocsr()
    density = slq(A, 60, num_probes=10, seed=1)
    xs = np.linspace(-1.5, 1.5, 31)  # the bulk of [-2, 2]
    lo, hi = density.cdf_band(xs, 0.95)
    qlo, qhi = density.cdf_bounds(xs)
    width = hi - lo
    half = chebyshev_halfwidth(1.0, probe_variance_factor("rademacher", n), 10, 0.95)
    logger.info("band width in the bulk: mean %.4f, max %.4f", width.mean(), width.max())
    # Probe part 2 * 0.0224 at F = 1/2 plus the quadrature gap (about two weights, 2/60).
    assert half == pytest.approx(np.sqrt(1.0 / (2 * n * 10 * 0.05)) / 1.0, rel=1e-12)
    assert np.all(width <= (qhi - qlo) + 2.0 * half + 1e-12)
    assert width.mean() < 0.1 and width.max() < 0.13


def test_intervals_cover_trace_and_moments(known_spectrum: tuple[np.ndarray, np.ndarray]) -> None:
    A, lam = known_spectrum
    support = (float(lam[0]) - 0.1, float(lam[-1]) + 0.1)
    truths = {
        "trace": lam.sum(),
        "m2": np.mean(lam**2),
        "exp": np.mean(np.exp(lam / 4.0)),
        "step": np.mean(lam <= 0.3),
    }
    misses = dict.fromkeys(truths, 0)
    for seed in range(40):
        d = slq(A, 12, num_probes=2, seed=seed)
        intervals = {
            "trace": d.trace_interval(0.8, support=support),
            "m2": d.moment_interval(2, 0.8, support=support),
            "exp": d.expectation_interval(lambda t: np.exp(t / 4.0), 0.8, support=support),
            "step": d.expectation_interval(lambda t: (t <= 0.3) * 1.0, 0.8, support=support),
        }
        for key, (lo, hi) in intervals.items():
            misses[key] += not (lo <= truths[key] <= hi)
    limit = binomial_limit(0.2, 40)
    assert all(count / 40 <= limit for count in misses.values()), misses
    # Moments up to 2m - 1 are exact per probe: the interval is the probe fluctuation only.
    d = slq(A, 12, num_probes=2, seed=0)
    lo, hi = d.moment_interval(1, 0.8, support=support)
    half = chebyshev_halfwidth(support[1] - support[0], 2.0 / lam.size, 2, 0.8)
    assert hi - lo == pytest.approx(2 * half, rel=1e-6)
    assert (lo + hi) / 2 == pytest.approx(d.moment(1), abs=1e-12)


def test_exact_eigenvalues_give_exact_bands() -> None:
    d = SpectralDensity.from_eigenvalues([0.0, 1.0, 2.0, 3.0])
    lo, hi = d.cdf_band(np.array([0.5, 2.0]))
    assert lo.tolist() == hi.tolist() == [0.25, 0.75]
    assert d.expectation_interval(np.square) == (3.5, 3.5)


def test_band_refusals() -> None:
    A = synthetic.wigner(40, seed=0)
    explicit = slq(A, 5, probes=np.random.default_rng(0).standard_normal((40, 3)))
    with pytest.raises(ValueError, match="explicit"):
        explicit.cdf_band(0.0)
    lo, hi = explicit.cdf_band(0.0, probe_distribution="gaussian")
    assert 0.0 <= lo <= hi <= 1.0
    d = slq(A, 5, seed=0)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            d.cdf_band(0.0, bad)
    with pytest.raises(ValueError, match="support"):
        d.expectation_interval(np.exp, support=(0.0, 0.1))
    with pytest.raises(ValueError, match="not built by Gauss"):
        SpectralDensity([0.0], [1.0]).cdf_band(0.0)


@pytest.mark.parametrize("backend", ["torch", "array_api_strict"])
def test_explicit_probes_in_any_namespace(backend: str) -> None:
    n = 50
    A = synthetic.wigner(n, seed=0)
    rng = np.random.default_rng(5)
    V = np.stack([random_probe(n, "rademacher", rng) for _ in range(3)], axis=1)
    reference = slq(A, 8, num_probes=3, seed=5)  # the same probes drawn from the seed
    wrap = torch.from_numpy if backend == "torch" else array_api_strict.asarray
    density = slq(wrap(A), 8, probes=wrap(V))
    np.testing.assert_allclose(density.nodes, reference.nodes, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(density.weights, reference.weights, rtol=1e-10, atol=1e-13)
    mixed = slq(A, 8, probes=wrap(V))  # numpy operator, probes of another namespace
    np.testing.assert_allclose(mixed.nodes, reference.nodes, rtol=1e-12, atol=1e-12)


def test_explicit_probe_validation() -> None:
    A = np.eye(4)
    with pytest.raises(ValueError, match="probes"):
        slq(A, 2, probes=np.ones((3, 2)))
    with pytest.raises(ValueError, match="probes"):
        slq(A, 2, probes=np.zeros((4, 1)))
    with pytest.raises(ValueError, match="num_probes"):
        slq(A, 2, probes=np.ones((4, 2)), num_probes=3)
    with pytest.raises(TypeError, match="probes"):
        slq(A, 2, probes="ones")


@pytest.mark.parametrize(
    ("call", "kind", "match"),
    [
        (lambda: wilson_chebyshev([0.9], [0.1], 0.01, 10, 0.95), ValueError, "'lower_mean'"),
        (lambda: wilson_chebyshev([0.5], [0.5], -0.01, 10, 0.95), ValueError, "'kappa'"),
        (lambda: wilson_chebyshev([0.5], [0.5], float("nan"), 10, 0.95), ValueError, "'kappa'"),
        (lambda: wilson_chebyshev([0.5], [0.5], 0.01, 0, 0.95), ValueError, "'num_probes'"),
        (lambda: wilson_chebyshev([0.5], [0.5, 0.6], 0.01, 2, 0.95), ValueError, "'upper_mean'"),
        (lambda: chebyshev_halfwidth(1.0, 0.01, 0, 0.95), ValueError, "'num_probes'"),
        (lambda: chebyshev_halfwidth(1.0, 0.01, 2.5, 0.95), TypeError, "'num_probes'"),
        (lambda: chebyshev_halfwidth(-1.0, 0.01, 2, 0.95), ValueError, "'oscillation'"),
        (lambda: chebyshev_halfwidth(1.0, None, 2, 0.95), TypeError, "'kappa'"),
        (
            lambda: quadrature_expectation_bounds([1.0], [1.0], np.exp, (0, 2), resolution=1),
            ValueError,
            "'resolution'",
        ),
    ],
)
def test_band_helpers_refuse_bad_parameters(call: Any, kind: type[Exception], match: str) -> None:
    """An inverted band came back for lower > upper, a zero-width one for kappa < 0, and a
    ZeroDivisionError for P = 0."""
    with pytest.raises(kind, match=f"Argument {match}: expected"):
        call()


@pytest.mark.parametrize(
    ("resolution", "kind"), [(0, ValueError), (-5, ValueError), (2.5, TypeError)]
)
def test_expectation_interval_refuses_a_bad_resolution(
    resolution: Any, kind: type[Exception]
) -> None:
    """``resolution=0`` or ``2.5`` silently became 2 (the interval shrank from 53.2 to 47.2)."""
    d = slq(np.diag(np.arange(1.0, 31.0)), 6, num_probes=3, seed=0)
    with pytest.raises(kind, match="Argument 'resolution': expected an integer >= 2"):
        d.expectation_interval(lambda t: -((t - 15.0) ** 2), support=(1, 30), resolution=resolution)
    exact = SpectralDensity.from_eigenvalues([1.0, 2.0])  # validated even where unused
    with pytest.raises(kind, match="Argument 'resolution'"):
        exact.expectation_interval(np.exp, resolution=resolution)

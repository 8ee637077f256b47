"""Certified cdf bounds for close eigenvalues, and exact 0/1 ends of the confidence band.

Close nodes split their mass only to delta/gap (Davis–Kahan), so the weights of a Gauss
rule are not known to relative accuracy; and the Wilson-type band must contain F = 1
beyond the spectrum (and F = 0 below it) exactly, not to 1e-16.
"""

from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral import slq
from spectral.bounds import (
    probe_variance_factor,
    quadrature_cdf_bounds,
    quadrature_expectation_bounds,
    split_tolerance,
    wilson_chebyshev,
)

TRUTH_TOL = 1e-14  # rounding of the exact F_v summed from the diagonal


def probe_cdf(lam: np.ndarray, v: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Exact F_v(x) = sum_{lam_j <= x} v_j^2 / |v|^2 of diag(lam)."""
    c = v**2 / (v @ v)
    return np.array([c[lam <= x].sum() for x in np.ravel(xs)])


def test_split_tolerance_is_delta_over_gap() -> None:
    w = split_tolerance([0.0, 1.0, 1.0 + 1e-8, 1.0 + 1e-8], 1e-14)
    assert w[0] == 0.0 and w[-1] == 0.0  # C_0 = 0 and C_m = 1 are exact
    assert w[1] == pytest.approx(1e-14 / (1.0 - 1e-14))
    assert w[2] == pytest.approx(1e-6, rel=1e-5)
    assert w[3] == 1.0  # coincident nodes: no information on the split
    assert np.all(split_tolerance([0.0, 1.0, 1.0], 0.0) == 0.0)


def test_two_close_eigenvalues_even_split() -> None:
    """diag(1, 1 + 3e-8), v = (1, 1): F_v = 1/2 between the eigenvalues (missed by 3.6e-9)."""
    density = slq(np.diag([1.0, 1.0 + 3e-8]), 2, probes=np.ones((2, 1)))
    xs = 1.0 + np.array([3e-9, 1e-8, 1.5e-8, 2e-8, 2.7e-8])
    lower, upper = density.cdf_bounds(xs, probe=0)
    assert np.all(lower <= 0.5) and np.all(0.5 <= upper)
    assert np.all(upper - lower < 1e-6)  # still tight: delta/gap ~ 2e-7


@pytest.mark.parametrize("seed", [0, 5, 38])
def test_two_clusters_1e10_apart(seed: int) -> None:
    """Clusters at 1 and 1 + 1e-10 (n = 200, m = 60): missed by up to 1e-5 before."""
    lam = np.r_[np.full(50, 1.0), np.full(50, 1 + 1e-10), np.full(50, 2.0), np.linspace(5, 6, 50)]
    v = np.random.default_rng(seed).standard_normal(200)
    density = slq(np.diag(lam), 60, probes=v[:, None])
    xs = np.array([1.0, 1.0 + 2e-11, 1.0 + 5e-11, 1.0 + 1e-10, 1.5, 3.0])
    lower, upper = density.cdf_bounds(xs, probe=0)
    truth = probe_cdf(lam, v, xs)
    assert np.all(lower <= truth + TRUTH_TOL) and np.all(truth <= upper + TRUTH_TOL)


@st.composite
def close_spectra(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, probe): n <= 8, clusters with gaps 1e-12 .. 1e-4, maybe repeated."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lam: list[float] = []
    for centre in np.sort(rng.uniform(-5.0, 5.0, draw(st.integers(1, 3)))):
        gaps = 10.0 ** rng.uniform(-12.0, -4.0, draw(st.integers(0, 2)))
        lam.extend(centre + np.r_[0.0, np.cumsum(gaps)])
    values = np.repeat(np.array(lam), draw(st.integers(1, 2)))[:8]
    if draw(st.booleans()):
        v = rng.standard_normal(values.size)
    else:
        v = rng.choice([-1.0, 1.0], values.size)
    return values, v


@given(close_spectra())
def test_cdf_bounds_contain_exact_cdf_for_close_eigenvalues(
    case: tuple[np.ndarray, np.ndarray],
) -> None:
    lam, v = case
    density = slq(np.diag(lam), lam.size, probes=v[:, None])
    offsets = np.array([-1e-7, -1e-9, -1e-11, 0.0, 1e-11, 1e-9, 1e-7])
    points = np.r_[lam, density.nodes]
    xs = np.unique((points[:, None] + offsets[None, :]).ravel())
    xs = np.r_[xs, (points[:, None] + points[None, :]).ravel() / 2.0]
    lower, upper = density.cdf_bounds(xs, probe=0)
    truth = probe_cdf(lam, v, xs)
    assert np.all(lower <= truth + TRUTH_TOL), float(np.max(lower - truth))
    assert np.all(truth <= upper + TRUTH_TOL), float(np.max(truth - upper))


def test_expectation_bounds_with_close_eigenvalues() -> None:
    """Three copies each of 0.065218386, 0.065219830, 0.065219955: f = x^2 missed by 1e-7."""
    lam = np.repeat([-4.1364381368547605, 0.06521838596077778, 0.06521982986439562], 3)
    lam = np.r_[lam, np.full(3, 0.0652199552203865)]
    v = np.array([0.8870077749338153, 0.282840295701735, -0.511611700526905, 0.0655950955625179])
    v = np.r_[v, 1.3710853715756686, 1.1530663941817965, 0.386902226933139, 0.4485263830803767]
    v = np.r_[v, -0.2604080417729926, -0.11286324321516372, 0.6066693824226794]
    v = np.r_[v, -0.10218464932996439]
    density = slq(np.diag(lam), lam.size, probes=v[:, None])
    exact = float((v**2 / (v @ v)) @ lam**2)
    assert density.probe_invariant is not None and density.probe_tolerance is not None
    lower, upper = quadrature_expectation_bounds(
        density.nodes,
        density.weights,
        np.square,
        (float(lam.min()), float(lam.max())),
        invariant=bool(density.probe_invariant[0]),
        tol=float(density.probe_tolerance[0]),
    )
    assert lower <= exact + 1e-14 and exact <= upper + 1e-14


def test_widths_on_a_separated_spectrum_unchanged() -> None:
    """diag(linspace(0, 1, 400)), m = 30: the split widening adds < 1e-8 of the width."""
    density = slq(np.diag(np.linspace(0.0, 1.0, 400)), 30, num_probes=4, seed=0)
    xs = np.linspace(-0.1, 1.1, 1201)
    lower, upper = density.cdf_bounds(xs)
    assert density.probe_tolerance is not None and density.probe_nodes is not None
    widths = []
    for k in range(4):  # without the split widening (the previous rounding model)
        lo, hi = quadrature_cdf_bounds(
            density.probe_nodes[k],
            density.probe_weights[k],  # type: ignore[index]
            xs,
            tol=float(density.probe_tolerance[k]),
            split_tol=0.0,
        )
        widths.append(hi - lo)
    reference = float(np.mean(widths))
    assert reference > 0.05
    assert float(np.mean(upper - lower)) <= (1.0 + 1e-8) * reference


# ---------------------------------------------------------------- the band's 0/1 ends
SETTINGS = [
    (n, p, conf)
    for n in (10, 50, 100, 400, 1000, 2000, 12345)
    for p in (1, 2, 3, 4, 10)
    for conf in (0.9, 0.95, 0.99)
]


@pytest.mark.parametrize(("n", "num_probes", "confidence"), SETTINGS)
def test_wilson_chebyshev_exact_ends(n: int, num_probes: int, confidence: float) -> None:
    kappa = probe_variance_factor("rademacher", n)
    lo, hi = wilson_chebyshev([0.0, 1.0], [0.0, 1.0], kappa, num_probes, confidence)
    assert lo[0] == 0.0 and hi[1] == 1.0  # F = 0 and F = 1 are never excluded
    c = kappa / (num_probes * (1.0 - confidence))
    assert lo[1] == pytest.approx(1.0 / (1.0 + c), rel=1e-13)
    assert hi[0] == pytest.approx(c / (1.0 + c), rel=1e-13)


def exact_roots(f: float, c: float) -> tuple[Decimal, Decimal]:
    """The two roots of (f - F)^2 = c F (1 - F) to 120 digits."""
    getcontext().prec = 120
    fd, cd = Decimal(f), Decimal(c)
    disc = (cd * (4 * fd * (1 - fd) + cd)).sqrt()
    return (2 * fd + cd - disc) / (2 * (1 + cd)), (2 * fd + cd + disc) / (2 * (1 + cd))


def test_wilson_chebyshev_rounds_outward() -> None:
    rng = np.random.default_rng(0)
    f = np.r_[rng.uniform(0.0, 1.0, 200), 10.0 ** rng.uniform(-18, -1, 100)]
    f = np.r_[f, 1.0 - f[-100:], 0.5, 0.25, 0.75]
    for kappa in (0.0, 2e-5, 2e-3, 0.2):
        c = kappa / (0.05 / 1)
        lo, hi = wilson_chebyshev(f, f, kappa, 1, 0.95)
        for value, low, high in zip(f, lo, hi):
            root_lo, root_hi = exact_roots(float(value), c)
            assert Decimal(float(low)) <= root_lo and root_hi <= Decimal(float(high))
            assert float(root_lo) - float(low) <= 2e-14 and float(high) - float(root_hi) <= 2e-14


def test_wilson_chebyshev_nan_stays_nan() -> None:
    lo, hi = wilson_chebyshev([np.nan, 0.2], [np.nan, 0.4], 0.0, 1, 0.9)
    assert np.isnan(lo[0]) and np.isnan(hi[0])
    assert lo[1] <= 0.2 and hi[1] >= 0.4


@pytest.mark.parametrize("simultaneous", [False, True])
def test_cdf_band_is_one_beyond_and_zero_below_the_spectrum(simultaneous: bool) -> None:
    xs = np.array([-1e6, -1.0, -1e-3, 1.0, 2.0, 1e6])
    for seed in range(20):
        d = slq(np.diag(np.linspace(0.0, 1.0, 400)), 10, seed=seed)
        lower, upper = d.cdf_band(xs, 0.9, simultaneous=simultaneous)
        assert np.all(lower[:3] == 0.0) and np.all(upper[3:] == 1.0)
    lower, upper = d.cdf_band(1.0, 0.9)
    assert upper == 1.0

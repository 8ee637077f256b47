"""SpectralDensity: a discrete probability measure with smoothing, moments, CDF and W1."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

from spectral.density import SpectralDensity
from spectral.io import CorruptFileError, save_npz


@st.composite
def densities(draw: st.DrawFn) -> SpectralDensity:
    """Densities with clustered, negative and outlying nodes and skewed weights."""
    size = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nodes = rng.uniform(-1.0, 1.0, size) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if size > 3 and draw(st.booleans()):
        nodes[:3] = nodes[0]  # repeated nodes
    raw = rng.exponential(size=size) ** draw(st.sampled_from([1.0, 4.0]))
    weights = raw / raw.sum()
    return SpectralDensity(nodes, weights)


@given(densities())
def test_weights_form_a_probability_vector(d: SpectralDensity) -> None:
    assert np.all(d.weights >= 0)
    assert abs(d.weights.sum() - 1.0) <= 1e-14
    assert np.all(np.diff(d.nodes) >= 0)
    assert d.moment(0) == pytest.approx(1.0, abs=1e-14)


@given(densities(), st.sampled_from(["gaussian", "lorentzian"]))
def test_smooth_integrates_to_one(d: SpectralDensity, kernel: str) -> None:
    spread = float(d.nodes[-1] - d.nodes[0])
    sigma = max(spread, 1e-3) / 20.0
    width = 12.0 * sigma if kernel == "gaussian" else 2000.0 * sigma
    grid = np.linspace(d.nodes[0] - width, d.nodes[-1] + width, 40001)
    values = d.smooth(grid, sigma, kernel)
    assert np.all(values >= 0)
    integral = np.trapezoid(values, grid)
    exact_mass = d.smoothed_mass(grid[0], grid[-1], sigma, kernel)
    # The trapezoid rule on a grid with >= 3 points per sigma matches the exact mass.
    assert integral == pytest.approx(exact_mass, abs=2e-4)
    # Gaussian: 12 sigma tails are below 1e-30; Lorentzian: mass outside is ~2/(pi*2000).
    assert exact_mass == pytest.approx(1.0, abs=1e-9 if kernel == "gaussian" else 4e-4)
    assert d.smoothed_mass(-np.inf, np.inf, sigma, kernel) == pytest.approx(1.0, abs=1e-14)


@given(densities())
def test_cdf_is_monotone_right_continuous_and_ends_at_one(d: SpectralDensity) -> None:
    lo, hi = float(d.nodes[0]), float(d.nodes[-1])
    xs = np.sort(np.concatenate([np.linspace(lo - 1, hi + 1, 301), d.nodes]))
    F = d.cdf(xs)
    assert np.all(np.diff(F) >= 0)
    assert d.cdf(lo - 1e-9 - abs(lo) * 1e-9) == 0.0
    assert d.cdf(hi) == 1.0
    # right-continuity: F(node) includes the node's own weight
    for node in np.unique(d.nodes):
        mass_up_to = d.weights[d.nodes <= node].sum()
        assert d.cdf(node) == pytest.approx(mass_up_to, abs=1e-14)


@given(densities(), st.integers(0, 6))
def test_moments_match_quadrature(d: SpectralDensity, p: int) -> None:
    # Moment p of the discrete measure is the p-th power integrated by its own quadrature.
    expected = float(np.sum(d.weights * d.nodes**p))
    assert d.moment(p) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert d.expectation(lambda x: x**p) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    # ...and it is the limit of the smoothed density's moments as sigma -> 0 (p <= 2 here).
    if p <= 2:
        sigma = max(float(d.nodes[-1] - d.nodes[0]), 1e-3) / 200.0
        grid = np.linspace(d.nodes[0] - 12 * sigma, d.nodes[-1] + 12 * sigma, 20001)
        smoothed = np.trapezoid(grid**p * d.smooth(grid, sigma), grid)
        # Gaussian smoothing adds sigma^2 to the second moment and nothing to the first.
        correction = sigma**2 if p == 2 else 0.0
        scale = max(1.0, float(np.abs(d.nodes).max())) ** p
        assert smoothed == pytest.approx(expected + correction, abs=1e-9 * scale)


@given(densities(), densities())
def test_wasserstein_is_scipys_and_a_metric(a: SpectralDensity, b: SpectralDensity) -> None:
    w = a.wasserstein(b)
    ref = scipy.stats.wasserstein_distance(a.nodes, b.nodes, a.weights, b.weights)
    assert w == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert w == pytest.approx(b.wasserstein(a), rel=1e-12, abs=1e-15)
    assert a.wasserstein(a) == pytest.approx(0.0, abs=1e-12)
    # W1 = integral |F_a - F_b| on a fine grid
    xs = np.union1d(a.nodes, b.nodes)
    integral = np.sum(np.abs(a.cdf(xs[:-1]) - b.cdf(xs[:-1])) * np.diff(xs))
    assert w == pytest.approx(integral, rel=1e-9, abs=1e-12)


def test_wasserstein_against_eigenvalues_uses_uniform_weights() -> None:
    d = SpectralDensity([0.0, 2.0], [0.5, 0.5])
    assert d.wasserstein(np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert d.wasserstein([1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="other"):
        d.wasserstein([np.nan])


def test_negative_mass_with_and_without_tolerance() -> None:
    d = SpectralDensity([-3e-4, -2.0, 0.0, 1.0], [0.35, 0.02, 0.13, 0.5])
    assert d.negative_mass() == pytest.approx(0.37)
    assert d.negative_mass(tol=1e-3) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="tol"):
        d.negative_mass(-1.0)


def test_trace_is_n_times_mean() -> None:
    d = SpectralDensity.from_eigenvalues([1.0, 2.0, 3.0, 10.0])
    assert d.trace(4) == pytest.approx(16.0)
    with pytest.raises(ValueError, match="'n'"):
        d.trace(0)


def test_from_probes_pools_and_keeps_spread() -> None:
    pn = np.array([[0.0, 1.0, np.nan], [2.0, 3.0, 4.0]])
    pw = np.array([[0.25, 0.75, np.nan], [0.2, 0.3, 0.5]])
    d = SpectralDensity.from_probes(pn, pw)
    assert d.num_probes == 2
    assert d.weights.sum() == pytest.approx(1.0)
    assert d.nodes.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(d.weights, [0.125, 0.375, 0.1, 0.15, 0.25])
    np.testing.assert_allclose(d.probe_expectations(lambda x: x), [0.75, 3.3])
    assert d.moment(1) == pytest.approx((0.75 + 3.3) / 2)


@pytest.mark.parametrize(
    ("nodes", "weights", "match"),
    [
        ([0.0, 1.0], [0.5, 0.6], "sum"),
        ([0.0, 1.0], [1.5, -0.5], "non-negative"),
        ([0.0, np.inf], [0.5, 0.5], "finite"),
        ([0.0, 1.0], [1.0], "shape"),
        ([], [], "non-empty"),
    ],
)
def test_invalid_measures_are_refused(nodes: list[float], weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpectralDensity(nodes, weights)


def test_rounding_level_errors_are_renormalised() -> None:
    d = SpectralDensity([0.0, 1.0], [0.5 + 1e-12, 0.5 - 2e-12])
    assert d.weights.sum() == 1.0
    assert not d.weights.flags.writeable


@given(densities(), st.integers(0, 2**16))
def test_nan_points_give_nan_elementwise(d: SpectralDensity, seed: int) -> None:
    """As a ufunc would: NaN in, NaN out, at that point only (cdf(NaN) was 1.0)."""
    xs = np.random.default_rng(seed).uniform(-60.0, 60.0, (3, 4))
    xs[1, 2] = xs[0, 0] = np.nan
    nan = np.isnan(xs)
    assert np.isnan(d.cdf(np.nan))
    for values in (d.cdf(xs), d.smooth(xs, 0.5), d.smooth(xs, 0.5, "lorentzian")):
        assert values.shape == xs.shape
        np.testing.assert_array_equal(np.isnan(values), nan)
    np.testing.assert_array_equal(d.cdf(xs)[~nan], d.cdf(xs[~nan]))


@pytest.mark.parametrize(
    ("call", "kind", "match"),
    [
        (lambda d: d.smooth([0.0], None), TypeError, "'sigma': expected a positive finite"),
        (lambda d: d.negative_mass("0"), TypeError, "'tol': expected a finite number >= 0"),
        (lambda d: d.smoothed_mass(3.0, -3.0, 1.0), ValueError, "'b': expected a number >= a"),
        (lambda d: d.smoothed_mass(np.nan, 1.0, 1.0), ValueError, "'a'"),
        (lambda d: d.smoothed_mass(0.0, np.nan, 1.0), ValueError, "'b'"),
        (lambda d: d.smoothed_mass(0.0, 1.0, None), TypeError, "'sigma'"),
        (lambda d: d.probe_expectations(lambda x: 1.0), ValueError, "'f': .*returning shape"),
        (lambda d: d.probe_expectations(lambda x: "a"), ValueError, "'f'"),
        (lambda d: d.expectation("log"), TypeError, "'f': expected a vectorised callable"),
        (lambda d: SpectralDensity([1 + 1j], [1.0]), TypeError, "'nodes': expected real"),
    ],
)
def test_evaluation_arguments_are_refused_by_name(
    call: Any, kind: type[Exception], match: str
) -> None:
    """Before: numpy's "ufunc 'isfinite' not supported", a negative mass for a > b, NaN for
    a = NaN, a raw shape error from f (reported through trace_function)."""
    d = SpectralDensity.from_probes([[0.0, 1.0], [2.0, np.nan]], [[0.5, 0.5], [1.0, np.nan]])
    with pytest.raises(kind, match=f"Argument {match}"):
        call(d)


def test_smoothed_mass_over_infinite_intervals() -> None:
    """A guard for the new checks of ``a`` and ``b``: infinite ends stay allowed."""
    d = SpectralDensity([0.0, 1.0], [0.5, 0.5])
    assert d.smoothed_mass(-np.inf, np.inf, 0.3) == pytest.approx(1.0, abs=1e-15)
    assert d.smoothed_mass(2.0, 2.0, 0.3) == 0.0


def test_smooth_argument_checks() -> None:
    d = SpectralDensity([0.0], [1.0])
    with pytest.raises(ValueError, match="sigma"):
        d.smooth([0.0], 0.0)
    with pytest.raises(ValueError, match="kernel"):
        d.smooth([0.0], 1.0, kernel="box")
    assert d.smooth(np.zeros((2, 3)), 1.0).shape == (2, 3)


@pytest.mark.parametrize("kernel", ["gaussian", "lorentzian"])
def test_narrow_kernels_are_exact_or_refused(kernel: str) -> None:
    """Before: sigma = 1e-320 returned inf at the nodes and sigma = 1e-200 warned of
    overflow (t * t far in the tails).  A sigma whose kernel peak is not a finite float64
    is refused; narrow but normal widths give the peak at a node, 0 elsewhere, no warning."""
    d = SpectralDensity([0.0, 1.0], [0.25, 0.75])
    tiny = float(np.finfo(np.float64).tiny)
    for sigma in (1e-320, tiny / 2):
        with pytest.raises(ValueError, match=r"Argument 'sigma': expected .* >= 2.225e-308"):
            d.smooth([0.0], sigma, kernel)
        with pytest.raises(ValueError, match="Argument 'sigma'"):
            d.smoothed_mass(-1.0, 1.0, sigma, kernel)
    for sigma in (1e-200, tiny):
        peak = 1.0 / (sigma * np.sqrt(2 * np.pi)) if kernel == "gaussian" else 1.0 / (np.pi * sigma)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = d.smooth([0.0, 0.5, 1.0, 1e300], sigma, kernel)
            masses = [d.smoothed_mass(a, b, sigma, kernel) for a, b in ((-1, 0.5), (0.5, 2))]
        assert np.isfinite(values).all()
        np.testing.assert_allclose(values[[0, 2]], [0.25 * peak, 0.75 * peak], rtol=1e-15)
        if kernel == "gaussian":  # the Lorentzian's tails are ~ sigma / t^2 > 0
            assert values[1] == values[3] == 0.0
        assert masses == pytest.approx([0.25, 0.75], abs=1e-15)


def test_save_load_round_trip(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "sub" / "density.npz"
    pn = np.array([[0.0, 1.0, np.nan], [2.0, 3.0, 4.0]])
    pw = np.array([[0.25, 0.75, np.nan], [0.2, 0.3, 0.5]])
    d = SpectralDensity.from_probes(pn, pw)
    d.save(path)
    e = SpectralDensity.load(path)
    np.testing.assert_array_equal(e.nodes, d.nodes)
    np.testing.assert_array_equal(e.weights, d.weights)
    assert e.probe_nodes is not None and e.probe_weights is not None
    np.testing.assert_array_equal(e.probe_nodes, pn)
    np.testing.assert_array_equal(e.probe_weights, pw)
    # no pickle involved: the archive opens with allow_pickle=False
    with np.load(path, allow_pickle=False) as archive:
        assert set(archive.files) == {
            "format",
            "nodes",
            "weights",
            "probe_nodes",
            "probe_weights",
            "__sha256__",  # the content checksum (spectral.io.save_npz)
        }


@given(densities())
def test_save_load_is_bitwise_for_any_density(d: SpectralDensity) -> None:
    """The weights' renormalisation is idempotent: a round trip changes no bit (it
    changed the last bits of 54 of 300 random densities when every construction
    divided by the sum again)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        d.save(path)
        e = SpectralDensity.load(path)
    np.testing.assert_array_equal(e.nodes, d.nodes)
    np.testing.assert_array_equal(e.weights, d.weights)
    again = SpectralDensity(e.nodes, e.weights)
    np.testing.assert_array_equal(again.weights, d.weights)


def test_load_accepts_workflow_spectrum_files(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "spectrum.npz"
    save_npz(path, w=np.array([-1.0, 2.0]), gammas=np.array([0.4, 0.6]), num_params=10)
    d = SpectralDensity.load(path)
    assert d.trace(10) == pytest.approx(10 * (-0.4 + 1.2))


def test_load_refuses_corrupt_and_foreign_files(tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    (base / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(CorruptFileError):
        SpectralDensity.load(base / "bad.npz")
    save_npz(base / "foreign.npz", x=np.zeros(3))
    with pytest.raises(CorruptFileError, match="no spectral density"):
        SpectralDensity.load(base / "foreign.npz")
    save_npz(base / "invalid.npz", nodes=np.zeros(2), weights=np.array([0.9, 0.9]))
    with pytest.raises(CorruptFileError, match="invalid"):
        SpectralDensity.load(base / "invalid.npz")
    with pytest.raises(FileNotFoundError):
        SpectralDensity.load(base / "missing.npz")

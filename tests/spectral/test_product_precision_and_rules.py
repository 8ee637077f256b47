"""Contracts found by the tenth session's sweep of :mod:`spectral`.

* Products rounded more coarsely than the vectors (float32 products for float64 vectors)
  are refused: every error bound assumes products as precise as ``op.eps``, and the
  certified CDF bounds built on float64's eps excluded the true CDF by up to 0.11.
* The Gauss-rule bounds of :mod:`spectral.bounds` check their rule (a probability
  measure on finite nodes inside the stated support).
* Hutch++'s standard error includes the rounding of its sketched part, so its interval
  covers the trace of an exactly low-rank matrix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator

import spectral
from spectral import bounds
from spectral.blockeig import block_eigenpairs

N = 40


def _matrix(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    Q = Q * np.sign(np.diag(R))
    A: np.ndarray = (Q * eigenvalues) @ Q.T
    return (A + A.T) / 2


def _single_precision_matrix() -> np.ndarray:
    return _matrix(np.repeat([1.0, 1.0 + 2e-6, 3.0], [15, 15, 10]), 18).astype(np.float32)


def _coarse_operators(A32: np.ndarray) -> dict[str, object]:
    """Operators on float64 vectors whose products round to float32."""
    return {
        "callable": spectral.as_operator(lambda x: A32 @ x.astype(np.float32), N),
        "LinearOperator": LinearOperator(
            (N, N), matvec=lambda x: A32 @ np.asarray(x, np.float32).ravel(), dtype=np.float64
        ),
        "torch callable": spectral.as_operator(
            lambda x: torch.from_numpy(A32) @ x.float(), N, like=torch.zeros(N, dtype=torch.float64)
        ),
    }


@pytest.mark.parametrize("form", ["callable", "LinearOperator", "torch callable"])
@pytest.mark.parametrize(
    "run",
    [
        lambda A: spectral.lanczos(A, 5, seed=0),
        lambda A: spectral.slq(A, 5, num_probes=2, seed=0),
        lambda A: spectral.top_eigenpairs(A, 2, seed=0),
        lambda A: block_eigenpairs(A, 2, seed=0),
        lambda A: spectral.trace(A, method="hutch++", num_matvecs=9, seed=0),
    ],
    ids=["lanczos", "slq", "top_eigenpairs", "block_eigenpairs", "trace"],
)
def test_products_coarser_than_the_vectors_are_refused(form: str, run: object) -> None:
    A = _coarse_operators(_single_precision_matrix())[form]
    with pytest.raises(TypeError, match=r"Argument 'A':.*as precise as the vectors.*float32"):
        run(A)  # type: ignore[operator]


def test_float32_products_on_float32_vectors_give_certified_bounds_that_hold() -> None:
    A32 = _single_precision_matrix()
    op = spectral.as_operator(lambda x: A32 @ x, N, like=np.zeros(N, np.float32))
    assert op.eps == float(np.finfo(np.float32).eps)
    v = np.random.default_rng(18).choice([-1.0, 1.0], N).astype(np.float32)
    density = spectral.slq(op, 6, probes=v[:, None])
    lam, U = np.linalg.eigh(A32.astype(np.float64))  # the matrix the products apply
    points = np.unique(np.concatenate([lam, (lam[:-1] + lam[1:]) / 2, density.nodes]))
    weight = (U.T @ v.astype(np.float64)) ** 2 / float(v.astype(np.float64) @ v)
    exact = np.array([weight[lam <= x].sum() for x in points])
    lower, upper = density.cdf_bounds(points, probe=0)
    slack = 8 * N * np.finfo(np.float64).eps  # the summation of the exact CDF itself
    assert np.all(lower <= exact + slack) and np.all(exact <= upper + slack)


def test_a_widened_float64_product_of_float32_vectors_is_accepted() -> None:
    A32 = _single_precision_matrix()
    op = spectral.as_operator(lambda x: A32.astype(np.float64) @ x, N, like=np.zeros(N, np.float32))
    assert spectral.lanczos(op, 3, seed=0).alpha.dtype == np.float64


def _cdf(nodes: list[float], weights: list[float]) -> object:
    return bounds.quadrature_cdf_bounds(nodes, weights, [1.5])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: bounds.quadrature_cdf_bounds([1.0, 2.0], [0.9, 0.9], [1.5]), r"'weights'.*1\.8"),
        (
            lambda: bounds.quadrature_cdf_bounds([1.0, 2.0], [-0.5, 1.5], [1.5]),
            r"'weights'.*non-neg",
        ),
        (
            lambda: bounds.quadrature_cdf_bounds([1.0, 2.0], [np.nan, 1.0], [1.5]),
            r"'weights'.*finite",
        ),
        (
            lambda: bounds.quadrature_cdf_bounds([1.0, np.inf], [0.5, 0.5], [1.5]),
            r"'nodes'.*finite",
        ),
        (lambda: bounds.quadrature_cdf_bounds([1.0, 2.0], [1.0], [1.5]), r"'weights'.*shape"),
        (
            lambda: bounds.quadrature_expectation_bounds([], [], np.exp, (0.0, 3.0)),
            r"'nodes'.*at least one",
        ),
        (
            lambda: bounds.quadrature_expectation_bounds([1.0, 2.0], [1.0], np.exp, (0.0, 3.0)),
            r"'weights'.*shape",
        ),
        (
            lambda: bounds.quadrature_expectation_bounds([1.0, 2.0], [0.9, 0.9], np.exp, (0, 3)),
            r"'weights'.*1\.8",
        ),
        (
            lambda: bounds.quadrature_expectation_bounds([1.0, 2.0], [0.5, 0.5], np.exp, (5, 6)),
            r"'support'.*every node",
        ),
        (
            lambda: bounds.quadrature_expectation_bounds([1.0], [1.0], 3.0, (0.0, 3.0)),
            r"'values_on'",
        ),
        (lambda: bounds.probe_variance_factor("cauchy", 10), r"Argument 'kind'"),
    ],
)
def test_gauss_rule_bounds_refuse_what_is_not_a_probability_rule(call: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()  # type: ignore[operator]


def test_gauss_rule_bounds_accept_rounded_weights_and_nan_padding() -> None:
    lo, hi = bounds.quadrature_cdf_bounds(
        [1.0, 2.0, np.nan], [0.5 + 1e-12, 0.5 - 1e-12, np.nan], [1.5], invariant=True
    )
    assert lo.tolist() == pytest.approx([0.5]) and hi.tolist() == pytest.approx([0.5])
    # a support that contains the nodes up to tol is accepted
    low, high = bounds.quadrature_expectation_bounds(
        [1.0, 2.0], [0.5, 0.5], lambda t: t, (1.0 + 1e-3, 2.0), tol=1e-3
    )
    assert low <= 1.5 <= high


@pytest.mark.parametrize("eigenvalues", [[50.0], [1.0] * 4], ids=["rank 1", "rank 4"])
def test_hutchpp_interval_covers_the_trace_of_an_exactly_low_rank_matrix(
    eigenvalues: list[float],
) -> None:
    spectrum = np.concatenate([np.zeros(N - len(eigenvalues)), eigenvalues])
    A = _matrix(spectrum, 123)
    exact = math.fsum(np.diag(A))  # the trace of the matrix as stored, correctly rounded
    norm = float(np.max(np.abs(spectrum)))
    for seed in range(40):
        estimate = spectral.trace(A, method="hutch++", num_matvecs=12, seed=seed)
        low, high = estimate.interval()
        assert low <= exact <= high
        # and the interval is of rounding size: sqrt(n) eps per sketch vector, times 2 and 4 of them
        assert estimate.stderr <= 2 * 4 * math.sqrt(N) * np.finfo(np.float64).eps * norm * 1.01


def test_marchenko_pastur_fit_of_a_subnormal_spectrum_equals_the_scaled_fit() -> None:
    # the CDF was interpolated in x, whose table spacing (1e-317) overflowed the slope:
    # a Kolmogorov distance of inf; the table is in the scale-free u = (x - a)/(b - a) now
    from spectral import rmt

    spectrum = np.linspace(1.0, 2.0, 50)
    scale = 2.0**-1030  # about 1e-310: subnormal
    tiny, plain = rmt.fit_marchenko_pastur(spectrum * scale), rmt.fit_marchenko_pastur(spectrum)
    assert 0.0 <= tiny.kolmogorov <= 1.0
    # subnormals keep about 44 of 53 bits here: agreement to 1e-9, not to eps
    assert tiny.kolmogorov == pytest.approx(plain.kolmogorov, rel=1e-9)
    points = np.linspace(0.5, 2.5, 9)
    np.testing.assert_allclose(tiny.cdf(points * scale), plain.cdf(points), rtol=1e-9, atol=1e-12)
    levels = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(tiny.quantile(levels) / scale, plain.quantile(levels), rtol=1e-9)


def test_a_fit_whose_trimmed_bulk_is_degenerate_names_trim() -> None:
    from spectral import rmt

    spectrum = np.r_[np.zeros(99), 1.0]  # std 0.0995; trimming the 1.0 leaves 99 zeros
    with pytest.raises(ValueError, match=r"Argument 'trim':.*trimming 1 of 100 points"):
        rmt.fit_semicircle(spectrum)
    assert rmt.fit_semicircle(spectrum, trim=False).radius > 0


def test_plotting_a_density_with_an_infinite_width_is_refused_before_any_warning() -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from spectral import plot

    density = spectral.slq(np.eye(20), 3, num_probes=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value" came first
        with pytest.raises(ValueError, match="Argument 'sigma'"):
            plot.plot_smoothed_density(density, sigma=float("inf"))


def test_an_operator_states_the_precision_of_its_products() -> None:
    # widen() hands spectral float64 vectors whose products carry float32's (bfloat16's)
    # rounding: the certified bounds excluded the true CDF by 0.2 with float64's eps
    from curvops import Dense
    from curvops.precision import widen

    A32 = _single_precision_matrix()
    wide = widen(Dense(torch.from_numpy(A32)))
    assert spectral.as_operator(wide).eps == float(np.finfo(np.float32).eps)
    lam, U = np.linalg.eigh(A32.astype(np.float64))
    slack = 8 * N * np.finfo(np.float64).eps
    for seed in range(5):
        v = np.random.default_rng(seed).choice([-1.0, 1.0], N)
        density = spectral.slq(wide, 6, probes=torch.from_numpy(v)[:, None])
        points = np.unique(np.concatenate([lam, (lam[:-1] + lam[1:]) / 2, density.nodes]))
        weight = (U.T @ v) ** 2 / float(v @ v)
        exact = np.array([weight[lam <= x].sum() for x in points])
        lower, upper = density.cdf_bounds(points, probe=0)
        assert np.all(lower <= exact + slack) and np.all(exact <= upper + slack)
    half = Dense(torch.eye(4, dtype=torch.bfloat16))
    bf16 = float(torch.finfo(torch.bfloat16).eps)
    assert spectral.as_operator(widen(half)).eps == bf16
    assert spectral.as_operator(half, like=np.zeros(4, np.float32)).eps == bf16


def test_a_float32_gauss_rule_is_accepted_to_float32_rounding() -> None:
    # weights from a float32 Jacobi matrix sum to 1 only to float32's rounding (6e-8 .. 3e-7
    # here): refused at 1e-8 per entry by the first version of the check
    rng = np.random.default_rng(0)
    for m in (3, 5, 10):
        diagonal = rng.uniform(0, 3, m).astype(np.float32)
        off = rng.uniform(0.1, 1, m - 1).astype(np.float32)
        T = np.diag(diagonal) + np.diag(off, 1) + np.diag(off, -1)
        nodes, vectors = np.linalg.eigh(T)
        weights = vectors[0] ** 2  # float32
        lower, upper = bounds.quadrature_cdf_bounds(nodes, weights, [1.5], probability_tol=1e-6)
        assert 0.0 <= lower[0] <= upper[0] <= 1.0
        low, high = bounds.quadrature_expectation_bounds(
            nodes, weights, np.exp, (float(nodes[0]), float(nodes[-1]))
        )
        assert low <= high
    with pytest.raises(ValueError, match="summing to 1"):  # but not anything in float32
        bounds.quadrature_cdf_bounds([1.0, 2.0], np.array([0.5, 0.6], np.float32), [1.5])


def _xtrace_by_definition(A: np.ndarray, Omega: np.ndarray) -> float:
    """(1/m) sum_i tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i, with
    Q_i an orthonormal basis of the range of A Omega_{-i} (rank by SVD)."""
    m, values = Omega.shape[1], []
    for i in range(m):
        Y = A @ np.delete(Omega, i, axis=1)
        U, sv, _ = np.linalg.svd(Y, full_matrices=False)
        Q = U[:, sv > 1e-10 * max(float(sv[0]), 1e-300)] if sv.size else U[:, :0]
        u = Omega[:, i] - Q @ (Q.T @ Omega[:, i])
        values.append(np.trace(Q.T @ A @ Q) + u @ A @ u)
    return float(np.mean(values))


@pytest.mark.parametrize("spectrum", ["rank 3 on 3 coordinates", "full rank"])
def test_xtrace_equals_its_definition_on_the_probes_it_drew(spectrum: str) -> None:
    # Rademacher probes restricted to a 3-coordinate support repeat up to sign: the
    # rank-one downdates then kept omega_i's own direction (mean 6.05 for a trace of 6)
    n = 50
    A = np.diag(np.r_[1.0, 2.0, 3.0, np.zeros(n - 3)])
    if spectrum == "full rank":
        A = _matrix(np.linspace(1.0, 3.0, n), 5)
    for seed in range(30):
        drawn: list[np.ndarray] = []

        def product(X: np.ndarray, drawn: list[np.ndarray] = drawn) -> np.ndarray:
            if not drawn:
                drawn.append(np.array(X, copy=True))
            return A @ X

        op = spectral.SymmetricOperator(
            lambda x: A @ x, template=np.zeros(n), matmat=product, protect_input=False
        )
        estimate = spectral.trace(op, method="xtrace", num_matvecs=8, seed=seed)
        expected = _xtrace_by_definition(A, drawn[0])
        assert estimate.value == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_the_exact_diagonal_reads_each_entry_at_its_own_scale() -> None:
    # one common power-of-two scale from the first block's products: later blocks of 1e20
    # overflowed to inf in float32, entries of 1e-300 beside 1e300 underflowed to 0
    d32 = np.r_[np.full(2097, 1e-20), np.full(1903, 1e20)].astype(np.float32)
    for d in (d32, np.r_[np.arange(1.0, 5.0) * 1e-300, np.arange(1.0, 5.0) * 1e300]):
        op = spectral.SymmetricOperator(
            lambda x, d=d: d * x,
            template=np.zeros(d.size, d.dtype),
            matmat=lambda X, d=d: d[:, None] * X,
        )
        np.testing.assert_array_equal(spectral.diagonal(op, method="exact"), d)

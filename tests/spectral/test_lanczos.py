"""The Lanczos process: relation, orthogonality, breakdown, quadrature, ghosts, errors."""

from __future__ import annotations

import functools
import importlib
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral import NumericalError, as_operator, check_symmetric, lanczos
from spectral.krylov import LanczosResult
from tests.spectral.strategies import (
    distinct_spectra,
    haar_orthogonal,
    rotate,
    rotated_matrices,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

EPS = np.finfo(np.float64).eps
ALL_MODES: list[str | int] = ["full", "none", "partial", "selective", 4]


def relation_error(A: np.ndarray, res: LanczosResult) -> float:
    """``||A Q - Q T - r e_m^T||_F`` (bounds the 2-norm) with ``r = beta_m q_{m+1}``."""
    Q = res.basis
    E = A @ Q - Q @ res.tridiagonal()
    E[:, -1] -= res.residual_vector
    return float(np.linalg.norm(E))


@given(data=rotated_matrices(), m=st.integers(1, 40), seed=st.integers(0, 1000))
def test_lanczos_relation_and_orthogonality(
    data: tuple[np.ndarray, np.ndarray], m: int, seed: int
) -> None:
    A, spectrum = data
    m = min(m, A.shape[0])
    norm_a = float(np.max(np.abs(spectrum)))
    for reorth in ("full", "none"):
        res = lanczos(A, m, seed=seed, reorth=reorth)
        k = res.num_iters
        assert k <= m and (k == m or res.breakdown)
        assert relation_error(A, res) <= 10 * k * EPS * norm_a
        assert np.all(np.isfinite(res.alpha)) and np.all(np.isfinite(res.beta))
        assert np.all(res.beta > 0)
        if reorth == "full":
            assert res.orthogonality_loss <= 10 * k * EPS


@functools.lru_cache(maxsize=4)
def outlier_matrix(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bulk in [0, 1] with outliers 5, 8, 10: Ritz values converge fast, orthogonality is lost."""
    rng = np.random.default_rng(seed)
    spectrum = np.sort(np.r_[rng.uniform(0.05, 1.0, n - 3), [5.0, 8.0, 10.0]])
    Q = haar_orthogonal(n, rng)
    A = (Q * spectrum) @ Q.T
    return (A + A.T) / 2, spectrum, Q


def test_orthogonality_is_lost_without_reorthogonalisation_only() -> None:
    A, _, _ = outlier_matrix()
    losses = {mode: lanczos(A, 100, seed=1, reorth=mode).orthogonality_loss for mode in ALL_MODES}
    assert losses["full"] < 1e-13
    assert losses["none"] > 0.5  # ghosts: the basis is far from orthonormal
    assert losses[4] > 0.5  # a short local window does not prevent it
    assert losses["partial"] < 10 * math.sqrt(EPS)  # semi-orthogonality
    assert losses["selective"] < 10 * math.sqrt(EPS)


@pytest.mark.parametrize("reorth", ALL_MODES)
def test_selective_partial_and_window_keep_the_relation(reorth: str | int) -> None:
    A, spectrum, _ = outlier_matrix()
    res = lanczos(A, 80, seed=2, reorth=reorth)
    assert relation_error(A, res) <= 1e-8 * spectrum[-1]
    if reorth in ("full", "partial", "selective"):
        values = res.ritz().values
        assert np.sum(np.abs(values - 10.0) < 1e-6) == 1  # no ghost copies


@given(data=distinct_spectra(), seed=st.integers(0, 1000))
def test_m_equal_to_distinct_count_reproduces_the_eigenvalues(
    data: tuple[np.ndarray, np.ndarray], seed: int
) -> None:
    A, distinct = data
    k = distinct.size
    res = lanczos(A, k, seed=seed)
    assert res.num_iters == k
    assert res.breakdown
    scale = float(np.max(np.abs(distinct)))
    np.testing.assert_allclose(res.ritz().values, distinct, rtol=0, atol=1e-10 * scale)
    # asking for more stops cleanly at the invariant subspace
    more = lanczos(A, min(k + 3, A.shape[0]), seed=seed)
    assert more.breakdown and more.num_iters == k
    np.testing.assert_allclose(more.ritz().values, distinct, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("reorth", ALL_MODES)
@pytest.mark.parametrize("values", [(1.0,), (1.0, 50.0), (0.0,)])
def test_identity_and_two_valued_spectra_never_nan(
    reorth: str | int, values: tuple[float, ...]
) -> None:
    n = 200
    spectrum = np.resize(np.asarray(values), n)
    A = rotate(np.sort(spectrum), 7)
    for m in (1, len(values), 10, n):
        res = lanczos(A, m, seed=3, reorth=reorth)
        assert np.all(np.isfinite(res.alpha)) and np.all(np.isfinite(res.beta))
        assert res.num_iters == min(m, len(values))
        assert res.breakdown == (m >= len(values))
        ritz = res.ritz()
        assert np.all(np.isfinite(ritz.values)) and np.all(np.isfinite(ritz.weights))
        if m >= len(values):
            np.testing.assert_allclose(ritz.values, sorted(values), atol=1e-12 * 50)


def test_exact_identity_breaks_down_after_one_step() -> None:
    res = lanczos(np.eye(50), 20, seed=0)
    assert res.num_iters == 1 and res.breakdown
    assert res.alpha.tolist() == pytest.approx([1.0])
    assert res.beta.shape == (0,)


@given(data=rotated_matrices(max_n=80), m=st.integers(1, 8), seed=st.integers(0, 1000))
def test_gauss_quadrature_is_exact_up_to_degree_2m_minus_1(
    data: tuple[np.ndarray, np.ndarray], m: int, seed: int
) -> None:
    A, spectrum = data
    A = A / np.max(np.abs(spectrum))  # ||A|| = 1 so moments stay O(1)
    v = np.random.default_rng(seed).standard_normal(A.shape[0])
    res = lanczos(A, m, v0=v)
    ritz = res.ritz()
    k = res.num_iters
    x = v / np.linalg.norm(v)
    powers = x.copy()
    for p in range(2 * k):
        exact = float(x @ powers)  # x^T A^p x
        gauss = float(np.sum(ritz.weights * ritz.values**p))
        assert gauss == pytest.approx(exact, abs=1e-11 * (p + 1))
        powers = A @ powers
    assert res.start_norm == pytest.approx(np.linalg.norm(v))


def test_ghosts_carry_the_true_weight_and_traces_agree() -> None:
    A, spectrum, Q = outlier_matrix()
    n = A.shape[0]
    v = np.random.default_rng(5).standard_normal(n)
    true_weight = float((Q[:, -1] @ v) ** 2 / (v @ v))
    none = lanczos(A, 100, v0=v, reorth="none").ritz()
    full = lanczos(A, 100, v0=v, reorth="full").ritz()
    near_none = np.abs(none.values - spectrum[-1]) < 1e-8
    near_full = np.abs(full.values - spectrum[-1]) < 1e-8
    assert near_none.sum() >= 3  # ghost copies of the converged outlier
    assert near_full.sum() == 1
    assert none.weights[near_none].sum() == pytest.approx(true_weight, rel=1e-8)
    assert full.weights[near_full].sum() == pytest.approx(true_weight, rel=1e-8)
    for f in (np.exp, np.log, np.sqrt, np.square):
        tr_none = n * np.sum(none.weights * f(none.values))
        tr_full = n * np.sum(full.weights * f(full.values))
        assert tr_none == pytest.approx(tr_full, rel=1e-8)


def test_store_basis_false_gives_the_same_recurrence() -> None:
    A, _, _ = outlier_matrix(120)
    stored = lanczos(A, 40, seed=4, reorth="none")
    lean = lanczos(A, 40, seed=4, reorth="none", store_basis=False)
    assert lean.basis is None and math.isnan(lean.orthogonality_loss)
    np.testing.assert_array_equal(lean.alpha, stored.alpha)
    np.testing.assert_array_equal(lean.beta, stored.beta)
    assert lean.ritz().vectors is None


def test_seed_and_generator_are_reproducible() -> None:
    A, _, _ = outlier_matrix(60)
    a = lanczos(A, 10, seed=11)
    b = lanczos(A, 10, seed=np.random.default_rng(11))
    np.testing.assert_array_equal(a.alpha, b.alpha)
    c = lanczos(A, 10, seed=12)
    assert not np.array_equal(a.alpha, c.alpha)


def test_nan_product_raises_naming_the_iteration() -> None:
    calls = {"count": 0}
    d = np.linspace(1.0, 2.0, 30)

    def matvec(x: np.ndarray) -> np.ndarray:
        calls["count"] += 1
        y = d * x
        if calls["count"] == 3:
            y[4] = np.nan
        return y

    with pytest.raises(NumericalError, match="iteration 3"):
        lanczos(as_operator(matvec, size=30), 10, seed=0)
    with pytest.raises(NumericalError, match="iteration 1"):
        lanczos(as_operator(lambda x: x * np.inf, size=30), 5, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"num_iters": 0}, ValueError, "num_iters"),
        ({"num_iters": 11}, ValueError, "num_iters"),
        ({"num_iters": 2.0}, TypeError, "num_iters"),
        ({"num_iters": True}, TypeError, "num_iters"),
        ({"v0": np.zeros(10)}, ValueError, "v0"),
        ({"v0": np.full(10, np.nan)}, ValueError, "v0"),
        ({"v0": np.ones(9)}, ValueError, "v0"),
        ({"v0": np.ones((10, 1))}, ValueError, "v0"),
        ({"v0": "abc"}, TypeError, "v0"),
        ({"v0": np.ones(10, dtype=complex)}, TypeError, "v0"),
        ({"reorth": "sometimes"}, ValueError, "reorth"),
        ({"reorth": 0}, ValueError, "reorth"),
        ({"reorth": True}, ValueError, "reorth"),
        ({"store_basis": False}, ValueError, "store_basis"),
        ({"store_basis": False, "reorth": "partial"}, ValueError, "store_basis"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_invalid_arguments_are_refused(
    kwargs: dict[str, object], kind: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"num_iters": 3, **kwargs}
    num_iters = args.pop("num_iters")
    with pytest.raises(kind, match=match):
        lanczos(np.eye(10), num_iters, **args)  # type: ignore[arg-type]


def test_non_square_and_non_symmetric_operators_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        lanczos(np.ones((3, 4)), 2)
    rng = np.random.default_rng(0)
    B = rng.standard_normal((40, 40))
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(B, 5, check_symmetric=True, seed=0)
    S = B + B.T
    res = lanczos(S, 5, check_symmetric=True, seed=0)
    assert res.num_iters == 5


@given(st.integers(-1000, 1000), st.sampled_from(["full", "none"]))
def test_v0_scaled_by_a_power_of_two_starts_the_same_process(exponent: int, mode: str) -> None:
    """Only the direction of ``v0`` matters: ``2**e u`` gives bitwise the process of ``u``
    (entries of 1e300 or 1e-300 were refused as 'not finite' when their squares overflowed
    or underflowed)."""
    A = np.diag(np.linspace(-1.0, 3.0, 30))
    u = np.random.default_rng(4).standard_normal(30)
    ref = lanczos(A, 8, v0=u, reorth=mode)
    res = lanczos(A, 8, v0=u * 2.0**exponent, reorth=mode)
    np.testing.assert_array_equal(res.alpha, ref.alpha)
    np.testing.assert_array_equal(res.beta, ref.beta)
    assert res.start_norm == math.ldexp(ref.start_norm, exponent)


def test_v0_of_extreme_magnitude() -> None:
    import torch

    A = np.diag(np.linspace(-1.0, 3.0, 30))
    u = np.random.default_rng(4).standard_normal(30)
    ref = lanczos(A, 8, v0=u)
    for scale in (1e300, 1e-300):
        np.testing.assert_allclose(lanczos(A, 8, v0=u * scale).alpha, ref.alpha, rtol=1e-14)
    # a float64 v0 beyond float32's range for a float32 operator: scaled before the cast
    A32 = torch.tensor(A, dtype=torch.float32)
    big = lanczos(A32, 8, v0=u * 2.0**200)
    np.testing.assert_array_equal(np.asarray(big.alpha), np.asarray(lanczos(A32, 8, v0=u).alpha))
    with pytest.raises(ValueError, match=r"'v0': expected a vector whose norm is finite"):
        lanczos(A, 8, v0=np.full(30, 1e308))
    with pytest.raises(ValueError, match=r"'v0': expected a nonzero vector with finite"):
        lanczos(A, 8, v0=np.full(30, np.nan))


def test_v0_is_normalised_and_list_accepted() -> None:
    res = lanczos(np.diag([1.0, 2.0, 3.0]), 2, v0=[2.0, 0.0, 0.0])
    assert res.start_norm == 2.0
    assert res.alpha[0] == 1.0
    assert res.breakdown and res.num_iters == 1


def test_reorthogonalisation_modes_do_what_they_document(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the blocked CGS2 calls: full at every step, partial only where the estimates say."""
    lanczos_module = importlib.import_module("spectral.krylov")
    original = lanczos_module._cgs2
    calls: list[int] = []

    def counting(Qb: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(int(Qb.shape[0]))
        return original(Qb, w)

    monkeypatch.setattr(lanczos_module, "_cgs2", counting)
    A, _, _ = outlier_matrix()
    m = 100
    counts = {}
    for mode in ("full", "partial", "none", 4):
        calls.clear()
        lanczos(A, m, seed=1, reorth=mode)
        counts[mode] = list(calls)
    # full: one blocked CGS2 against the whole basis per step (steps 2..m)
    assert counts["full"] == list(range(2, m + 1))
    # partial: reorthogonalisation in pairs of steps, at a minority of the steps here
    assert 0 < len(counts["partial"]) < m // 2
    assert counts["none"] == []
    # an integer window: against the last k vectors only
    assert max(counts[4]) == 4 and len(counts[4]) == m


def test_store_basis_false_uses_memory_of_order_n() -> None:
    """With ``store_basis=False`` the peak allocation is a few length-n vectors, not n x m."""
    n, m = 20_000, 200
    d = np.linspace(0.0, 1.0, n)
    op = as_operator(lambda x: d * x, size=n)
    vector_bytes = 8 * n
    peaks = {}
    for store in (False, True):
        tracemalloc.start()
        try:
            lanczos(op, m, seed=0, reorth="none", store_basis=store)
            peaks[store] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[False] <= 12 * vector_bytes  # q, q_prev, w, the product, the probe...
    assert peaks[True] >= m * vector_bytes  # the stored basis alone is m vectors


def test_breakdown_is_detected_after_a_small_beta() -> None:
    """8 distinct eigenvalues (one of multiplicity 1): m = 8 must stop with a clean breakdown.

    Found by the ``distinct_spectra`` property with the ``dev`` profile.  After an exact
    invariance the computed residual is rounding noise of size ``eps ||A||`` amplified by
    ``||A|| / beta_j`` (here ``beta_7 = 6.4e-3`` against ``||A|| = 4.25``), i.e. 1.4e5 eps,
    while the running norm estimate ``max ||A q_i|| = 3.10`` underestimates ``||A||``.
    Continuing past the missed breakdown adds spurious Ritz values of weight ~1e-18.
    """
    rng = np.random.default_rng(240)
    k = int(rng.integers(2, 9))
    gaps = rng.uniform(0.05, 1.0, k)
    start = rng.choice([0.0, -3.0, 1.0, 3.0])
    distinct = start + np.cumsum(gaps) - gaps[0]
    spectrum = np.repeat(distinct, rng.integers(1, 15, k))
    A = rotate(np.sort(spectrum), 241)
    assert k == 8
    more = lanczos(A, k + 3, seed=2)
    assert more.breakdown and more.num_iters == k


def test_check_symmetric_separates_rounding_from_asymmetry() -> None:
    """Threshold ``100 sqrt(n) eps`` (relative): rounding passes, a 1e-10 skew part does not."""
    rng = np.random.default_rng(3)
    n = 200
    B = rng.standard_normal((n, n))
    S, K = (B + B.T) / 2, (B - B.T) / 2
    # float32 products of an exactly symmetric matrix: mismatch at the float32 rounding level
    assert check_symmetric(S.astype(np.float32), seed=0) <= 100 * math.sqrt(n) * 2.0**-23
    # a skew part far below float32 rounding but far above float64 rounding
    assert check_symmetric(S + 1e-15 * K, seed=0) <= 100 * math.sqrt(n) * EPS
    with pytest.raises(ValueError, match="symmetric"):
        check_symmetric(S + 1e-10 * K, seed=0)
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(S + 1e-10 * K, 3, seed=0, check_symmetric=True)
    with pytest.raises(NumericalError, match="NaN"):
        check_symmetric(as_operator(lambda x: x * np.nan, size=n), seed=0)


@pytest.mark.parametrize("reorth", ALL_MODES)
def test_one_by_one_and_full_length_runs(reorth: str | int) -> None:
    """n = 1 breaks down at once; num_iters = n reproduces the spectrum (float64 and float32)."""
    res = lanczos(np.array([[3.0]]), 1, seed=0, reorth=reorth)
    assert res.num_iters == 1 and res.breakdown and res.alpha.tolist() == [3.0]
    assert res.ritz().weights.tolist() == [1.0]
    spectrum = np.array([-2.0, -0.5, 0.1, 1.0, 4.0])
    A = rotate(spectrum, 1)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        run = lanczos(A.astype(dtype), 5, seed=0, reorth=reorth)
        assert run.num_iters == 5 and run.basis.dtype == dtype
        np.testing.assert_allclose(run.ritz().values, spectrum, atol=tol * 4.0)
    # integer matrices and integer start vectors are promoted to float64
    res = lanczos(np.diag(np.arange(1, 6)), 5, v0=np.ones(5, dtype=np.int64), reorth=reorth)
    np.testing.assert_allclose(res.ritz().values, np.arange(1.0, 6.0), atol=1e-12)

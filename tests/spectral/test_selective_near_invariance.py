"""Selective reorthogonalisation when the Krylov space is nearly exhausted.

Orthogonalising only against converged Ritz vectors (Parlett-Scott) lost orthogonality
completely near an invariant subspace: on eigenvalues 1, 2, 3 (40 times each) and 30
eigenvalues within 1e-4 of 10, ``lanczos(A, 140, reorth="selective")`` ran all 140 steps to
``||Q^T Q - I|| = 36``, Ritz values in ``[-15.6, 18.5]`` and five pairs flagged converged
(reported residual 2.5e-9) with true residuals up to 1.3e-2, where ``"full"`` and
``"partial"`` stop at step 60 with ``breakdown=True``.  Selective mode now also keeps Simon's
estimates (projected like the vector) and falls back on CGS2 against the whole basis when
they exceed ``sqrt(eps)``.

The bounds below are those of a semi-orthogonal basis (every ``|q_i^T q_j| <= sqrt(eps)``):

* ``||Q^T Q - I||_2 <= (k - 1) sqrt(eps)`` (Gershgorin on the ``k x k`` Gram matrix);
* Ritz values within ``O(k eps ||A||)`` of ``[lambda_min, lambda_max]``: ``T_k`` is then the
  projection of ``A`` on ``range(Q_k)`` up to ``O(eps ||A||)`` (Simon, 1984); the test allows
  ``10 k eps ||A||`` (measured: at most ``0.8 k eps ||A||`` over 2,000 random problems);
* the true residual of a pair flagged converged exceeds the threshold by at most
  ``||F||`` (``A Q = Q T + r e_k^T + F``), each column of ``F`` being the few
  ``sqrt(eps) ||A||`` removed by reorthogonalisation, so ``||F||_2 <= ||F||_F <=
  c sqrt(k) sqrt(eps) ||A||``; the test allows ``c = 2`` (measured: ``c <= 0.4``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import ortho_group

from spectral import lanczos
from spectral.krylov import LanczosResult, Recurrence, RecurrenceSettings, _Basis, lanczos_step
from spectral.operator import as_operator
from tests.spectral.strategies import (
    rotate,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

EPS = float(np.finfo(np.float64).eps)


def check_semi_orthogonal_run(
    A: np.ndarray, spectrum: np.ndarray, m: int, seed: int, v0: np.ndarray | None = None
) -> LanczosResult:
    """Run selective Lanczos and check the three bounds of the module docstring."""
    res = lanczos(A, m, seed=seed, v0=v0, reorth="selective")
    k = res.num_iters
    norm_a = float(np.max(np.abs(spectrum)))
    assert k == m or res.breakdown
    assert res.orthogonality_loss <= max(k - 1, 1) * math.sqrt(EPS)
    ritz = res.ritz()
    slack = 10 * k * EPS * norm_a
    assert ritz.values.min() >= spectrum.min() - slack
    assert ritz.values.max() <= spectrum.max() + slack
    vectors = np.asarray(ritz.vectors)
    true = np.linalg.norm(A @ vectors - vectors * ritz.values, axis=0)
    threshold = 1e-8 * float(np.max(np.abs(ritz.values)))
    allowed = threshold + 2 * math.sqrt(k * EPS) * norm_a
    assert np.all(true[ritz.converged] <= allowed)
    return res


@pytest.mark.parametrize(
    ("n", "n_cluster", "width", "m"),
    [(150, 30, 1e-4, 140), (200, 50, 1e-3, 100), (120, 20, 1e-3, 110)],
)
def test_the_findings_matrices_stay_semi_orthogonal(
    n: int, n_cluster: int, width: float, m: int
) -> None:
    """Eigenvalues 1, 2, 3 repeated and ``n_cluster`` eigenvalues within ``width`` of 10
    (the finding's construction: spectrum, then start vector from one generator; the
    first case is the one quoted in the module docstring)."""
    rng = np.random.default_rng(0)
    repeated = np.repeat([1.0, 2.0, 3.0], (n - n_cluster) // 3)
    spectrum = np.r_[repeated, rng.normal(size=n - repeated.size) * width + 10.0]
    Q = ortho_group.rvs(n, random_state=0)
    A = (Q * spectrum) @ Q.T
    A = (A + A.T) / 2
    v0 = rng.normal(size=n)
    selective = check_semi_orthogonal_run(A, spectrum, m, seed=0, v0=v0)
    full = lanczos(A, m, v0=v0, reorth="full")
    if full.breakdown:  # the Krylov space is exhausted: selective finds that too
        assert selective.breakdown


@st.composite
def near_invariant_problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(A, spectrum, m, seed)``: a few multiple eigenvalues and a tight cluster, ``m`` near ``n``.

    The Krylov space of such a matrix is exhausted (to working precision) after about as
    many steps as it has well-separated eigenvalues, long before ``m``.
    """
    n = draw(st.integers(30, 120))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    k = draw(st.integers(1, 4))
    multiple = np.repeat(rng.uniform(-3.0, 3.0, k), rng.integers(1, max(2, n // k), k))
    width = 10.0 ** draw(st.floats(-8.0, -2.0))
    centre = draw(st.floats(-3.0, 12.0))
    cluster = centre + width * rng.standard_normal(n - multiple.size)
    spectrum = np.sort(np.r_[multiple, cluster])
    m = draw(st.integers(max(1, n - 15), n))
    return rotate(spectrum, seed + 1), spectrum, m, draw(st.integers(0, 1000))


@given(problem=near_invariant_problems())
def test_selective_is_semi_orthogonal_on_clustered_spectra(
    problem: tuple[np.ndarray, np.ndarray, int, int],
) -> None:
    A, spectrum, m, seed = problem
    check_semi_orthogonal_run(A, spectrum, m, seed)


def safeguard_triggers(A: np.ndarray, mode: str, m: int) -> int:
    """How often the step starts a full reorthogonalisation (``force_reorth`` set)."""
    op = as_operator(A)
    cfg = RecurrenceSettings(mode, 0, m, op.n, EPS)
    q = np.random.default_rng(3).standard_normal(op.n)
    st_ = Recurrence(j=0, q=q / np.linalg.norm(q), basis=_Basis(op, m))
    count = 0
    while not st_.done:
        was = st_.force_reorth
        st_ = lanczos_step(op, st_, cfg)
        count += st_.force_reorth and not was
    return count


def test_the_safeguard_is_rare_where_selective_orthogonalisation_suffices() -> None:
    """A bulk with outliers: the outliers' Ritz vectors carry the loss of orthogonality,
    selective orthogonalisation removes it and the projected estimates stay small, while
    partial reorthogonalisation repeatedly reorthogonalises against the whole basis."""
    rng = np.random.default_rng(0)
    spectrum = np.sort(np.r_[rng.uniform(0.0, 1.0, 397), [5.0, 8.0, 10.0]])
    A = rotate(spectrum, 4)
    partial, selective = (
        safeguard_triggers(A, "partial", 80),
        safeguard_triggers(A, "selective", 80),
    )
    assert partial >= 5
    assert selective <= 1


def test_estimates_missing_from_an_older_state_force_a_full_reorthogonalisation() -> None:
    """A selective state saved before the estimates existed (``omega_cur`` of length 1)
    resumes with a full reorthogonalisation instead of failing on their length."""
    rng = np.random.default_rng(1)
    spectrum = np.r_[np.repeat([1.0, 2.0, 3.0], 17), 10.0 + 1e-4 * rng.standard_normal(9)]
    A = rotate(spectrum, 2)
    op = as_operator(A)
    m = 50
    cfg = RecurrenceSettings("selective", 0, m, op.n, EPS)
    q = np.random.default_rng(5).standard_normal(op.n)
    st_ = Recurrence(j=0, q=q / np.linalg.norm(q), basis=_Basis(op, m))
    for _ in range(3):
        st_ = lanczos_step(op, st_, cfg)
    legacy = dataclasses.replace(st_, omega_cur=np.ones(1), omega_old=np.zeros(0))
    st_ = lanczos_step(op, legacy, cfg)
    assert st_.force_reorth and st_.omega_cur.shape == (st_.j + 1,)
    while not st_.done:
        st_ = lanczos_step(op, st_, cfg)
    assert st_.basis is not None
    Q = st_.basis.matrix()
    assert np.linalg.norm(Q.T @ Q - np.eye(st_.j), 2) <= st_.j * math.sqrt(EPS)


@pytest.mark.parametrize("reorth", ["partial", "selective"])
def test_reported_residuals_understate_by_at_most_the_dropped_components(reorth: str) -> None:
    """After a narrowly missed breakdown (``beta`` of 1e-7 then 2.4) the reported residuals
    ``beta_k |s_ki|`` were 1e-15 for true residuals of 1e-8 (the finding): as documented,
    the difference is the relation error ``||F s_i||``, at most ``c sqrt(k eps) ||A||``."""
    rng = np.random.default_rng(1)
    for size in [30, 40, 10] * 3 + [30]:  # the finding's generator state
        rng.normal(size=size)
    v0 = rng.normal(size=40)
    spectrum = np.repeat([-5.0, 0.0, 1e-6, 7.0], 10)
    Q = ortho_group.rvs(40, random_state=3)
    A = (Q * spectrum) @ Q.T
    A = (A + A.T) / 2
    res = lanczos(A, 10, v0=v0, reorth=reorth)
    ritz = res.ritz(tol=1e-10)
    vectors = np.asarray(ritz.vectors)
    true = np.linalg.norm(A @ vectors - vectors * ritz.values, axis=0)
    k = res.num_iters
    assert np.all(true <= ritz.residuals + 2 * math.sqrt(k * EPS) * 7.0)

"""spectral.krylov.lanczos_step: the plain recurrence, driven by hand, is the lanczos() run."""

from __future__ import annotations

import numpy as np
import pytest

from spectral import lanczos
from spectral.krylov import Recurrence, RecurrenceSettings, _Basis, lanczos_step
from spectral.operator import as_operator
from spectral.synthetic import prescribed_spectrum


@pytest.mark.parametrize("mode", ["full", "none", "partial", "selective"])
def test_stepping_by_hand_equals_lanczos(mode: str) -> None:
    A = prescribed_spectrum(np.r_[np.linspace(0.0, 1.0, 40), [3.0, 7.0]], seed=0)
    op = as_operator(A)
    q0 = np.random.default_rng(1).standard_normal(42)
    m = 20
    cfg = RecurrenceSettings(mode, 0, m, op.n, float(np.finfo(np.float64).eps))
    st = Recurrence(j=0, q=q0 * (1.0 / float(np.linalg.norm(q0))), basis=_Basis(op, m))
    states = [st]
    while not st.done:
        st = lanczos_step(op, st, cfg)
        states.append(st)
    ref = lanczos(A, m, v0=q0, reorth=mode)
    assert st.j == ref.num_iters == m and not st.breakdown
    assert np.array_equal(np.asarray(st.alphas), ref.alpha)
    assert np.array_equal(np.asarray(st.betas), ref.beta)
    # the step never changes the state it was given: state j holds j alphas
    assert [len(s.alphas) for s in states] == list(range(m + 1))
    # Golub & Van Loan (10.1.4): A Q_j = Q_j T_j + r_j e_j^T, to rounding; partial and
    # selective reorthogonalisation remove components of size sqrt(eps) from r_j without
    # changing T_j, so there the relation holds to the semi-orthogonal level
    Q = st.basis.matrix() if st.basis is not None else None
    assert Q is not None
    T = np.diag(st.alphas) + np.diag(st.betas, 1) + np.diag(st.betas, -1)
    E = A @ Q - Q @ T
    E[:, -1] -= st.residual
    eps = np.finfo(np.float64).eps
    tol = 100 * eps if mode in ("full", "none") else 10 * np.sqrt(eps)
    assert np.linalg.norm(E) <= tol * np.linalg.norm(A)


def test_breakdown_ends_the_recurrence() -> None:
    op = as_operator(np.diag([1.0, 2.0, 3.0]))
    cfg = RecurrenceSettings("full", 0, 3, 3, float(np.finfo(np.float64).eps))
    st = Recurrence(j=0, q=np.ones(3) / np.sqrt(3.0), basis=_Basis(op, 3))
    while not st.done:
        st = lanczos_step(op, st, cfg)
    assert st.j == 3 and st.breakdown and st.residual_norm < 1e-12

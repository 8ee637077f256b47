r"""One random vector suffices as n grows (the paper's Section 4 remark and Appendix A).

For :math:`v` uniform on the unit sphere :math:`S^{n-1}` and symmetric :math:`B` with
eigenvalues :math:`\lambda_j`, mean :math:`\bar\lambda = \mathrm{tr}(B)/n` and variance
:math:`s^2 = \frac1n\sum_j(\lambda_j - \bar\lambda)^2`,

.. math:: \mathbb{E}[v^\top B v] = \bar\lambda,\qquad \mathrm{Var}[v^\top B v] = 2 s^2/(n + 2).

(With :math:`v = g/\|g\|`, :math:`(v_j^2)` is Dirichlet(1/2, ..., 1/2), so
:math:`\mathrm{Var}(v_j^2) = 2(n-1)/(n^2(n+2))` and
:math:`\mathrm{Cov}(v_j^2, v_k^2) = -2/(n^2(n+2))`.)
Sphere probes are rotation invariant, so :math:`B` may be taken diagonal without loss of
generality, which keeps the products O(n). When the spectrum's spread is bounded the
variance falls like :math:`1/n`; with one dominant eigenvalue, :math:`s^2/\bar\lambda^2 \sim n`
and the relative error does not shrink at all.
"""

from __future__ import annotations

import numpy as np
import pytest

from spectral.operator import as_operator
from spectral.probes import random_probes
from spectral.quadrature import slq

SIZES = (64, 256, 1024, 4096)
SAMPLES = 1000


def _quadratic_forms(lam: np.ndarray, seed: int) -> np.ndarray:
    """``SAMPLES`` draws of ``v^T diag(lam) v`` for sphere probes from the library."""
    V = random_probes(lam.size, SAMPLES, "sphere", np.random.default_rng(seed))
    return np.einsum("i,ij->j", lam, V * V)


def _sd_of_sample_variance(samples: np.ndarray) -> float:
    centred = samples - samples.mean()
    return float(np.sqrt(max(np.mean(centred**4) - np.var(samples) ** 2, 0.0) / samples.size))


def _bulk(n: int) -> np.ndarray:
    """A spectrum of fixed shape: uniform on [0, 1] with 1/64 of the mass at 5 (s^2 ~ const)."""
    lam = np.linspace(0.0, 1.0, n)
    lam[-(n // 64) :] = 5.0
    return lam


@pytest.mark.parametrize("n", SIZES)
def test_sphere_probe_mean_and_variance(n: int) -> None:
    lam = _bulk(n)
    mean, s2 = lam.mean(), lam.var()
    theory_var = 2 * s2 / (n + 2)
    x = _quadratic_forms(lam, seed=n)
    # mean within 5 standard errors of the theoretical one
    assert abs(x.mean() - mean) <= 5 * np.sqrt(theory_var / SAMPLES)
    # sample variance within 5 of its own standard errors (fourth-moment estimate)
    assert abs(x.var(ddof=1) - theory_var) <= 5 * _sd_of_sample_variance(x)


def test_variance_decays_like_one_over_n() -> None:
    variances = np.array([_quadratic_forms(_bulk(n), seed=100 + n).var(ddof=1) for n in SIZES])
    slope = np.polyfit(np.log(SIZES), np.log(variances), 1)[0]
    # theory: log(2 s^2 / (n + 2)) has slope -n/(n+2), between -0.97 and -1 here
    assert -1.1 <= slope <= -0.9


def test_one_dominant_eigenvalue_does_not_concentrate() -> None:
    # B = diag(L, 0, ..., 0): n v^T B v / tr(B) = n v_1^2 has relative standard deviation
    # sqrt(2 (n - 1) / (n + 2)) -> sqrt(2), whatever n.
    relative_sd = []
    for n in SIZES:
        lam = np.zeros(n)
        lam[0] = 1000.0
        x = n * _quadratic_forms(lam, seed=200 + n) / lam.sum()
        assert abs(x.mean() - 1.0) <= 5 * np.sqrt(2.0 / SAMPLES)  # still unbiased
        relative_sd.append(x.std(ddof=1))
    relative_sd_arr = np.array(relative_sd)
    assert np.all(relative_sd_arr > 1.2)
    slope = np.polyfit(np.log(SIZES), np.log(relative_sd_arr**2), 1)[0]
    assert slope > -0.1  # no decay, against -1 for a bounded spectrum
    # the bounded spectrum's relative spread does shrink
    bulk_sd = [n * _quadratic_forms(_bulk(n), seed=n).std() / _bulk(n).sum() for n in SIZES]
    assert bulk_sd[-1] < 0.2 * bulk_sd[0]


def test_one_probe_slq_density_converges_as_n_grows() -> None:
    # The W1 distance between a single-probe SLQ density and the spectrum shrinks with n.
    errors = []
    for n in (100, 1000, 10000):
        lam = np.linspace(0.0, 1.0, n) ** 2
        op = as_operator(lambda x, lam=lam: lam * x, size=n)
        w1 = [slq(op, 20, probe="sphere", seed=s).wasserstein(lam) for s in range(4)]
        errors.append(np.mean(w1))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.5 * errors[0]

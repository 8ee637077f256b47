"""Confidence intervals of trace estimates, and ``method="slq"`` at any scale.

* ``trace(method="xtrace")``: the leave-one-out terms are exchangeable and correlated, so
  the i.i.d. standard-error formula runs low (0.64 to 0.91 of the true standard deviation
  over 1000 seeds, ``n = 200``) and a "95 %" interval covered as little as 79 %:
  ``interval()`` now refuses a confidence interval for XTrace (an explicit ``z`` is plain
  arithmetic), while Hutchinson and Hutch++ intervals keep their coverage.
* ``trace(method="slq")`` raised ``OverflowError`` for ``diag(1.5e308, -0.2e308, -0.2e308)``
  (finite trace 1.1e308) and did not scale exactly with a power of two: it now runs on the
  operator scaled by a power of two like the other methods.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral import trace
from spectral.estimators import _mean_stderr
from tests.spectral.strategies import (
    rotate,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

EPS = float(np.finfo(np.float64).eps)


def test_xtrace_estimates_refuse_a_confidence_interval() -> None:
    A = rotate(np.linspace(-3.0, 7.0, 50), 0)
    est = trace(A, method="xtrace", num_matvecs=12, seed=0)
    assert est.num_samples == 6 and math.isfinite(est.stderr)
    for kwargs in ({}, {"confidence": 0.9}):
        with pytest.raises(ValueError, match=r"'method'.*'hutch\+\+'.*received 'xtrace'"):
            est.interval(**kwargs)
    # an explicit quantile is arithmetic, with no coverage claimed
    assert est.interval(2.0) == (est.value - 2.0 * est.stderr, est.value + 2.0 * est.stderr)
    for method in ("hutchinson", "hutch++", "slq"):
        lo, hi = trace(A, method=method, num_matvecs=12, num_iters=6, seed=0).interval()
        assert math.isfinite(lo) and lo <= hi


@pytest.mark.parametrize("num_matvecs", [12, 60])
@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("decay", [False, True])
def test_hutchinson_and_hutchpp_intervals_cover_at_their_rate(
    method: str, num_matvecs: int, decay: bool
) -> None:
    """Over ``R`` seeds the number of 95 % intervals that cover ``tr(A)`` is Binomial(R, p)
    with ``p`` about 0.95 (Student's t of i.i.d. terms; close to normal here, a sum over
    ``n = 100`` entries). Four binomial standard deviations below 0.95 leaves room for the
    central-limit approximation; an interval built on a low standard error (XTrace's
    covered 79-83 %) falls far below."""
    n, rounds = 100, 300
    spectrum = 1.0 / np.sqrt(np.arange(1.0, n + 1.0)) if decay else np.linspace(-3.0, 7.0, n)
    A = rotate(spectrum, 1)
    exact = float(np.trace(A))
    covered = 0
    for seed in range(rounds):
        lo, hi = trace(A, method=method, num_matvecs=num_matvecs, seed=seed).interval()
        covered += lo <= exact <= hi
    assert covered / rounds >= 0.95 - 4.0 * math.sqrt(0.95 * 0.05 / rounds)


def test_slq_trace_of_a_huge_operator_is_finite() -> None:
    """Each probe's sample ``n sum_i w_i theta_i`` is about ``tr(A) = 1.1e308 > 2**1023``."""
    A = np.diag([1.5e308, -0.2e308, -0.2e308])
    est = trace(A, method="slq", num_matvecs=6, num_iters=3, seed=0)
    n, m = 3, 3
    bound = 10 * n * m * EPS * 1.5e308  # rounding of m Lanczos steps and n-term sums
    assert abs(est.value - 1.1e308) <= bound
    assert est.stderr <= bound  # Rademacher probes on a diagonal: every sample is tr(A)


@pytest.mark.parametrize("exponent", [-1000, -520, 520, 1000])
def test_slq_trace_scales_exactly_with_a_power_of_two(exponent: int) -> None:
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    A = (Q * np.linspace(0.5, 6.0, 40)) @ Q.T
    base = trace(A, method="slq", num_matvecs=24, num_iters=6, seed=3)
    scaled = trace(A * 2.0**exponent, method="slq", num_matvecs=24, num_iters=6, seed=3)
    assert scaled.value == math.ldexp(base.value, exponent)
    assert scaled.stderr == math.ldexp(base.stderr, exponent)


def test_mean_and_stderr_of_samples_beyond_two_to_the_1023() -> None:
    """The scaling factor ``2**e`` with ``2**(e-1) <= max|x| < 2**e`` is ``2**1024`` here, not
    a float: scaling by ``2**-e`` (exact) still works, and so do subnormal samples."""
    huge = np.array([1.0, 1.5, 1.25]) * 2.0**1023
    mean, stderr = _mean_stderr(huge)
    assert mean == 1.25 * 2.0**1023
    assert stderr == math.ldexp(0.25 / math.sqrt(3.0), 1023)
    tiny = np.array([1.0, 3.0]) * 5e-324
    assert _mean_stderr(tiny)[0] == 2 * 5e-324

"""Estimators at any scale, NaN in products, 16-bit operators, singular log-determinants.

Found by an adversarial sweep of the public API; each test fails on the code before
its fix:

* ``trace(method="xtrace")`` of an SPD matrix times ``2**-520`` was 62 % off (NaN at
  ``2**600``), a float32 ``frobenius_norm_squared`` of norm 2e-25 was 0, and
  ``schatten_norm(p=100)`` of a matrix of norm 4e-5 was 0: the estimators now run on the
  operator scaled by a power of two (exact) and scale back;
* a NaN in a product gave a NaN trace, diagonal or Frobenius norm instead of
  ``NumericalError``;
* every entry point raised a raw ``TypeError`` on a torch ``bfloat16`` operator (the
  curvature operator of a bfloat16 model), and ``trace`` a raw linear-algebra error on
  float16: 16-bit operators are now run with float64 vectors around their products;
* ``trace_function(A, "log")`` of an exactly singular PSD matrix returned a finite
  log-determinant (of a rounding error).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spectral
from spectral.errors import NumericalError


def _spd(n: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.linspace(0.5, 6.0, n)) @ Q.T


@pytest.mark.parametrize("exponent", [-520, -60, 60, 520, 600])
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_estimates_scale_exactly_with_a_power_of_two(exponent: int, method: str) -> None:
    A = _spd()
    base = spectral.trace(A, method=method, num_matvecs=24, seed=3)
    scaled = spectral.trace(A * 2.0**exponent, method=method, num_matvecs=24, seed=3)
    assert scaled.value == math.ldexp(base.value, exponent)
    assert scaled.stderr == math.ldexp(base.stderr, exponent)
    assert abs(base.value - np.trace(A)) <= 0.1 * np.trace(A)  # a sound estimate to scale


def test_frobenius_and_diagonal_scale_exactly_also_in_float32() -> None:
    A = _spd(12).astype(np.float32)
    base = spectral.frobenius_norm_squared(A, num_matvecs=8, seed=1)
    tiny = spectral.frobenius_norm_squared(A * np.float32(2.0**-84), num_matvecs=8, seed=1)
    assert tiny.value == math.ldexp(base.value, -168) > 0.0
    d = spectral.diagonal(A, method="exact")
    d_tiny = spectral.diagonal(A * np.float32(2.0**-84), method="exact")
    np.testing.assert_array_equal(d_tiny, d * np.float32(2.0**-84))
    h = spectral.diagonal(A, num_matvecs=8, seed=2)
    h_big = spectral.diagonal(A * np.float32(2.0**100), num_matvecs=8, seed=2)
    np.testing.assert_array_equal(h_big, h * np.float32(2.0**100))


def test_schatten_norm_for_large_p_at_any_scale() -> None:
    A = _spd(30)
    exact = np.linalg.eigvalsh(A)
    for scale in (1e-5, 1.0, 1e3):
        for p in (2.0, 50.0, 100.0):
            top = float(np.abs(exact).max())
            want = scale * top * float(np.sum(np.abs(exact / top) ** p) ** (1 / p))
            got = spectral.schatten_norm(scale * A, p, num_iters=30, num_probes=4, seed=0)
            assert abs(got.value - want) <= 0.1 * want, (scale, p)
    with pytest.raises(ValueError, match=r"Argument 'p'.*top_eigenpairs"):
        spectral.schatten_norm(A, math.inf)


def _nan_at(n: int, i: int, j: int) -> np.ndarray:
    A = np.eye(n)
    A[i, j] = A[j, i] = np.nan
    return A


@pytest.mark.parametrize(
    "call",
    [
        lambda A: spectral.trace(A, method="hutchinson", num_matvecs=6, seed=0),
        lambda A: spectral.trace(A, method="hutch++", num_matvecs=6, seed=0),
        lambda A: spectral.trace(A, method="xtrace", num_matvecs=6, seed=0),
        lambda A: spectral.diagonal(A, num_matvecs=6, seed=0),
        lambda A: spectral.diagonal(A, method="exact"),
        lambda A: spectral.frobenius_norm_squared(A, num_matvecs=6, seed=0),
    ],
)
def test_nan_in_a_product_raises(call: object) -> None:
    with pytest.raises(NumericalError, match="NaN or Inf"):
        call(_nan_at(8, 2, 5))  # type: ignore[operator]


U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_operators_run_in_float64_around_their_products(dtype: torch.dtype) -> None:
    A = _spd(16)
    low = torch.tensor(A, dtype=dtype)
    exact = np.linalg.eigvalsh(low.double().numpy())  # the rounded matrix
    result = spectral.lanczos(low, 16, seed=0)
    assert result.alpha.dtype == np.float64 and result.basis.dtype == torch.float64
    ritz = result.ritz()
    # Weyl: within the products' error (a few u |A|) plus the residual
    bound = 8 * U[dtype] * np.abs(exact).max() + ritz.residuals[-1]
    assert abs(ritz.values[-1] - exact[-1]) <= bound
    values, _ = spectral.top_eigenpairs(low, 1, seed=0, tol=1e-2)
    assert abs(values[0] - exact[-1]) <= 8 * U[dtype] * exact[-1] + 1e-2 * exact[-1]
    est = spectral.trace(low, num_matvecs=15, seed=0)  # hutch++: QR in float64
    assert abs(est.value - exact.sum()) <= 0.2 * exact.sum()
    density = spectral.slq(low, 8, num_probes=2, seed=0)
    assert density.nodes.dtype == np.float64


def test_numpy_float16_and_the_curvature_operator_of_a_bfloat16_model() -> None:
    A = _spd(10).astype(np.float16)
    assert spectral.trace(A, method="xtrace", num_matvecs=10, seed=0).value > 0
    from curvops import HessianOperator
    from curvops.precision import widen

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(6, 3, generator=gen).to(torch.bfloat16), torch.tensor([0, 1] * 3))
    H = HessianOperator(net, torch.nn.CrossEntropyLoss(), data)
    direct = spectral.lanczos(H, 6, seed=0)
    wrapped = spectral.lanczos(widen(H), 6, seed=0)
    np.testing.assert_array_equal(direct.alpha, wrapped.alpha)
    np.testing.assert_array_equal(direct.beta, wrapped.beta)


def test_log_and_inverse_of_a_singular_operator_are_refused() -> None:
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    singular = (Q[:, :30] * np.linspace(1.0, 4.0, 30)) @ Q[:, :30].T  # rank 30, PSD
    for f in ("log", "inv"):
        with pytest.raises(ValueError, match=r"Argument 'A'.*zero to working precision"):
            spectral.trace_function(singular, f, num_iters=40, num_probes=2, seed=5)
    with pytest.raises(ValueError, match=r"Argument 'A'"):
        spectral.trace_function(np.diag([1.0, 2.0, 0.0, 3.0]), "log", num_iters=4, num_probes=2)
    regular = _spd(20)
    est = spectral.trace_function(regular, "log", num_iters=20, num_probes=3, seed=0)
    assert math.isfinite(est.value) and math.isfinite(est.stderr)  # a regular one is accepted


@pytest.mark.parametrize("scale", [1e-310, 1e-315])
def test_subnormal_operators_are_not_reported_as_nan(scale: float) -> None:
    """A finite operator with subnormal entries gave "the product A @ q contains NaN or
    Inf": the product was finite, but ``1 / beta`` of a subnormal ``beta`` overflowed.
    Subnormals carry fewer bits (``2**-1074 / scale`` relative), so the results agree with
    the normal-range ones to that quantisation, times the recurrence's growth."""
    A = np.diag(np.arange(1.0, 11.0))
    quantum = 2.0**-1074 / scale  # relative spacing of the subnormal entries
    ref, res = spectral.lanczos(A, 5, seed=0), spectral.lanczos(A * scale, 5, seed=0)
    np.testing.assert_allclose(res.alpha / scale, ref.alpha, rtol=1e3 * quantum)
    values, _ = spectral.top_eigenpairs(A * scale, 2, seed=0)
    np.testing.assert_allclose(values / scale, [9.0, 10.0], rtol=1e3 * quantum)

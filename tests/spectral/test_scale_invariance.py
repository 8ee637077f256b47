"""Spectra scale with the operator: ``2**e A`` has eigenvalues ``2**e lambda``.

Every algorithm here is equivariant under a power-of-two scaling in exact arithmetic,
and with overflow- and underflow-safe norms (:func:`spectral._backend.vector_norm`)
also in floating point: the Lanczos coefficients of ``2**e A`` are bitwise those of
``A`` times ``2**e``.  Before, a float32 operator with norm ``1e-22`` (squares below
float32's normal range) gave top eigenvalues 78 % off and SLQ nodes 84 % off without
an error, and a float64 one with norm ``1e-160`` eigenvalues wrong by 3e6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral import lanczos, slq, top_eigenpairs, trace
from spectral._backend import namespace, vector_norm
from tests.spectral.strategies import (
    rotate,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

SPECTRUM = np.r_[np.linspace(-0.3, 0.5, 45), 1.0, 1.5, 2.0]
A64 = rotate(SPECTRUM, seed=3)


@given(st.integers(-900, 900))
def test_lanczos_coefficients_scale_exactly(e: int) -> None:
    ref = lanczos(A64, 12, seed=0)
    res = lanczos(A64 * 2.0**e, 12, seed=0)
    np.testing.assert_array_equal(res.alpha, np.ldexp(ref.alpha, e))
    np.testing.assert_array_equal(res.beta, np.ldexp(ref.beta, e))


@given(st.integers(-900, 900))
def test_top_eigenpairs_slq_and_trace_scale(e: int) -> None:
    s = 2.0**e
    ref_values, _ = top_eigenpairs(A64, 3, seed=0)
    values, _ = top_eigenpairs(A64 * s, 3, seed=0)
    np.testing.assert_allclose(values / s, ref_values, rtol=1e-13)
    np.testing.assert_allclose(np.sort(ref_values), [1.0, 1.5, 2.0], rtol=1e-12)
    ref, dens = slq(A64, 15, num_probes=2, seed=0), slq(A64 * s, 15, num_probes=2, seed=0)
    # probe by probe: nodes of different probes may tie to rounding and swap places in
    # the merged, sorted arrays (e = -405 did), within one probe they are distinct
    for k in range(2):
        np.testing.assert_allclose(
            dens.probe_nodes[k] / s, ref.probe_nodes[k], rtol=1e-13, atol=1e-15
        )
        np.testing.assert_allclose(
            dens.probe_weights[k], ref.probe_weights[k], rtol=1e-12, atol=1e-15
        )
    t_ref, t = trace(A64, seed=0), trace(A64 * s, seed=0)
    assert t.value / s == pytest.approx(t_ref.value, rel=1e-13)
    assert t.stderr / s == pytest.approx(t_ref.stderr, rel=1e-12)


@pytest.mark.parametrize("e", [-100, -80, -70, 0, 60, 100])
def test_float32_operators_of_any_scale(e: int) -> None:
    """``2**-70`` (about 1e-21) is where the plain float32 norm failed (below ``2**-100``
    the matrix's own small entries would be denormal: not ``2**e A`` any more)."""
    A = torch.tensor(A64, dtype=torch.float32)
    ref = lanczos(A, 12, seed=0)
    res = lanczos(A * 2.0**e, 12, seed=0)
    np.testing.assert_array_equal(np.asarray(res.alpha), np.ldexp(np.asarray(ref.alpha), e))
    np.testing.assert_array_equal(np.asarray(res.beta), np.ldexp(np.asarray(ref.beta), e))
    values, _ = top_eigenpairs(A * 2.0**e, 3, seed=0, tol=1e-5)
    np.testing.assert_allclose(np.sort(np.ldexp(values, -e)), [1.0, 1.5, 2.0], rtol=1e-5)


@given(
    st.lists(
        st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3)),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([np.float32, np.float64]),
)
def test_vector_norm_is_the_plain_norm_in_range(values: list[float], dtype: type) -> None:
    x = np.asarray(values, dtype=dtype)
    xp = namespace(x)
    assert vector_norm(xp, x) == np.sqrt(np.sum(x * x, dtype=dtype))
    t = torch.tensor(x)
    assert torch.equal(vector_norm(namespace(t), t), torch.linalg.vector_norm(t))


@pytest.mark.parametrize(
    ("dtype", "e"), [(np.float32, -140), (np.float32, 120), (np.float64, -1070)]
)
def test_vector_norm_out_of_the_plain_range(dtype: type, e: int) -> None:
    base = np.array([3.0, 4.0, 0.0])
    x = np.ldexp(base, e).astype(dtype)
    got = float(vector_norm(namespace(x), x))
    assert got == pytest.approx(math.ldexp(5.0, e), rel=1e-6)
    rows = np.stack([x, np.zeros(3, dtype=dtype), base.astype(dtype)])
    np.testing.assert_allclose(
        vector_norm(namespace(rows), rows, axis=1), [math.ldexp(5.0, e), 0.0, 5.0], rtol=1e-6
    )
    for bad, want in ((np.nan, np.nan), (np.inf, np.inf)):
        y = x.copy()
        y[1] = bad
        np.testing.assert_equal(float(vector_norm(namespace(y), y)), want)

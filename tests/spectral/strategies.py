"""Hypothesis strategies for the Lanczos-core tests: spectra under random Haar rotations.

Spectra mix a bulk, tight clusters, negative values and outliers; the matrix is
``Q diag(spectrum) Q^T`` with ``Q`` Haar-distributed (QR of a Gaussian with the
sign fix of Mezzadri, 2007), exactly symmetrised.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def single_threaded_blas() -> Iterator[None]:
    """Run each test with one BLAS/OpenMP thread.

    On the shared 2-core machine a multi-threaded OpenBLAS spins when the cores
    are busy: a 120 x 120 QR took 0.4 s of CPU instead of 1 ms.  Test modules
    import this autouse fixture.
    """
    with threadpool_limits(limits=1):
        yield


def haar_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed ``n x n`` orthogonal matrix."""
    Z = rng.standard_normal((n, n))
    Q, R = np.linalg.qr(Z)
    return Q * np.sign(np.diag(R))


def rotate(spectrum: np.ndarray, seed: int) -> np.ndarray:
    """The symmetric matrix ``Q diag(spectrum) Q^T`` for a Haar ``Q`` drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    Q = haar_orthogonal(spectrum.size, rng)
    A = (Q * spectrum) @ Q.T
    return (A + A.T) / 2


@st.composite
def spectra(draw: st.DrawFn, min_n: int = 20, max_n: int = 120) -> np.ndarray:
    """A spectrum of size ``n`` with a bulk, optional clusters, negatives and outliers."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lo = draw(st.sampled_from([0.0, -1.0, -0.2]))
    values = rng.uniform(lo, 1.0, n)
    num_clusters = draw(st.integers(0, 3))
    pos = 0
    for _ in range(num_clusters):
        size = draw(st.integers(2, max(2, n // 6)))
        centre = draw(st.floats(-2.0, 2.0, allow_nan=False))
        width = draw(st.sampled_from([0.0, 1e-8, 1e-4]))
        end = min(n, pos + size)
        values[pos:end] = centre + width * rng.standard_normal(end - pos)
        pos = end
    num_outliers = draw(st.integers(0, 4))
    scale = draw(st.sampled_from([3.0, 10.0, 100.0]))
    for i in range(num_outliers):
        sign = draw(st.sampled_from([1.0, -1.0]))
        values[n - 1 - i] = sign * scale * (1.0 + i)
    return np.sort(values)


@st.composite
def rotated_matrices(
    draw: st.DrawFn, min_n: int = 20, max_n: int = 120
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, spectrum)`` with ``A = Q diag(spectrum) Q^T`` and ``Q`` Haar."""
    spectrum = draw(spectra(min_n, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    return rotate(spectrum, seed), spectrum


@st.composite
def distinct_spectra(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """``(A, distinct values)``: ``k`` well-separated values with multiplicities, rotated."""
    k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    gaps = rng.uniform(0.05, 1.0, k)
    start = draw(st.floats(-3.0, 3.0, allow_nan=False))
    distinct = start + np.cumsum(gaps) - gaps[0]
    mult = rng.integers(1, 15, k)
    spectrum = np.repeat(distinct, mult)
    n = spectrum.size
    if n < k + 2:
        spectrum = np.concatenate([spectrum, np.full(k + 2 - n, distinct[0])])
    return rotate(np.sort(spectrum), seed + 1), distinct

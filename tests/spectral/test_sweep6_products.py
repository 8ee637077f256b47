"""What spectral asks of a user's product (sweep 6, findings 3 and 4).

* A product returning complex (a Hermitian matrix behind a callable or a
  ``LinearOperator``) or integer arrays was run silently: numpy dropped the imaginary
  parts with a warning and the Ritz values belonged to no matrix.  Such products are
  refused with a ``TypeError`` naming ``A`` and the dtype received.
* A product that modifies its input in place (``x *= 2`` inside a user's matvec)
  corrupted the run: Lanczos handed it its own ``q_j`` and reused it (Ritz values of
  -9e18 for a spectrum in [1, 20]).  Every product now receives a private copy, so the
  results are those of the same product without the side effect, bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import array_api_strict as xps
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator

import spectral
from spectral.blockeig import block_eigenpairs
from tests.spectral.strategies import single_threaded_blas  # noqa: F401 (autouse fixture)

N = 20


def _hermitian() -> np.ndarray:
    rng = np.random.default_rng(0)
    H = rng.standard_normal((6, 6)) + 1j * rng.standard_normal((6, 6))
    return (H + H.conj().T) / 2


@pytest.mark.parametrize(
    "make",
    [
        lambda H: spectral.as_operator(lambda x: H @ x, size=6),
        lambda H: LinearOperator((6, 6), matvec=lambda x: H @ x, dtype=np.float64),
        lambda H: spectral.as_operator(lambda x: (H.real @ x).astype(np.int64), size=6),
        lambda H: spectral.as_operator(lambda x: H.real @ x > 0, size=6),
    ],
    ids=["complex callable", "complex LinearOperator", "int", "bool"],
)
def test_non_real_floating_products_are_refused(make: Callable[[np.ndarray], Any]) -> None:
    H = _hermitian()
    calls: list[Callable[[Any], Any]] = [
        lambda A: spectral.lanczos(A, 3, seed=0),
        lambda A: spectral.slq(A, 3, num_probes=2, seed=0),
        lambda A: spectral.trace(A, method="hutchinson", num_matvecs=4, seed=0),
        lambda A: spectral.trace(A, method="hutch++", num_matvecs=6, seed=0),
        lambda A: spectral.top_eigenpairs(A, 1, seed=0),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning must not be reached
        for call in calls:
            with pytest.raises(TypeError, match=r"Argument 'A':.*real floating-point") as info:
                call(make(H))
            assert "dtype" in str(info.value)


def test_a_complex_block_product_is_refused() -> None:
    H = _hermitian()
    A = LinearOperator(
        (6, 6), matvec=lambda x: (H @ x).real, matmat=lambda X: H @ X, dtype=np.float64
    )
    for method in ("hutchinson", "hutch++", "xtrace"):
        with pytest.raises(TypeError, match=r"Argument 'A':.*real floating-point.*complex128"):
            spectral.trace(A, method=method, num_matvecs=6, seed=0)


def test_real_floating_products_of_every_namespace_pass() -> None:
    A = np.diag(np.arange(1.0, N + 1))
    reference = spectral.lanczos(A, 5, seed=0).alpha
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        At = torch.tensor(A).to(dtype)
        op = spectral.as_operator(lambda x, At=At: At @ x, size=N, like=torch.zeros(N, dtype=dtype))
        np.testing.assert_allclose(spectral.lanczos(op, 5, seed=0).alpha, reference, rtol=1e-2)
    As = xps.asarray(A)
    strict = spectral.as_operator(lambda x: As @ x, size=N, like=xps.zeros(N, dtype=xps.float64))
    np.testing.assert_array_equal(spectral.lanczos(strict, 5, seed=0).alpha, reference)
    # float32 products are accepted for float32 vectors (the bounds then use float32's eps)
    single = spectral.as_operator(
        lambda x: (A @ x).astype(np.float32), size=N, like=np.zeros(N, np.float32)
    )
    np.testing.assert_allclose(spectral.lanczos(single, 5, seed=0).alpha, reference, rtol=1e-6)


def test_the_dtype_is_checked_once_per_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectral import _backend

    seen: list[Any] = []
    original = _backend.is_real_floating
    op = spectral.as_operator(lambda x: 2.0 * x, size=N)
    monkeypatch.setattr(
        _backend, "is_real_floating", lambda xp, d: seen.append(d) or original(xp, d)
    )
    for _ in range(50):
        op.matvec(np.ones(N))
    assert seen == [np.dtype(np.float64)]


# --------------------------------------------------------------------- mutating products
A_DIAG = np.diag(np.arange(1.0, N + 1))


def _scaling_matvec(x: np.ndarray) -> np.ndarray:
    y = A_DIAG @ x
    x *= 2.0  # in place: the caller's vector
    return y


class _ScalingOperator(LinearOperator):
    """A ``LinearOperator`` whose single and block products both scale their input."""

    def __init__(self) -> None:
        super().__init__(dtype=np.dtype(np.float64), shape=(N, N))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        y = A_DIAG @ x
        x *= 2.0
        return y

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        Y = A_DIAG @ X
        X *= 2.0
        return Y


RUNS: dict[str, Callable[[Any], Any]] = {
    "lanczos full": lambda A: spectral.lanczos(A, 10, seed=1).alpha,
    "lanczos none": lambda A: spectral.lanczos(A, 10, seed=1, reorth="none").alpha,
    "lanczos partial": lambda A: spectral.lanczos(A, 10, seed=1, reorth="partial").beta,
    "slq": lambda A: spectral.slq(A, 6, num_probes=3, seed=1).nodes,
    "hutchinson": lambda A: spectral.trace(A, method="hutchinson", num_matvecs=6, seed=1).value,
    "hutch++": lambda A: spectral.trace(A, method="hutch++", num_matvecs=9, seed=1).value,
    "xtrace": lambda A: spectral.trace(A, method="xtrace", num_matvecs=8, seed=1).value,
    "diagonal": lambda A: spectral.diagonal(A, num_matvecs=6, seed=1),
    "frobenius": lambda A: spectral.frobenius_norm_squared(A, num_matvecs=6, seed=1).value,
    "top_eigenpairs": lambda A: spectral.top_eigenpairs(A, 2, seed=1)[0],
    "block_eigenpairs": lambda A: block_eigenpairs(A, 2, seed=1).values,
    "check_symmetric": lambda A: spectral.check_symmetric(A, seed=1),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_product_that_modifies_its_input_changes_nothing(name: str) -> None:
    clean = spectral.as_operator(lambda x: A_DIAG @ x, size=N)
    expected = RUNS[name](clean)
    for mutating in (spectral.as_operator(_scaling_matvec, size=N), _ScalingOperator()):
        np.testing.assert_array_equal(RUNS[name](mutating), expected, err_msg=name)


def test_lanczos_on_a_mutating_product_finds_the_spectrum() -> None:
    ritz = spectral.lanczos(spectral.as_operator(_scaling_matvec, size=N), N, seed=1).ritz()
    np.testing.assert_allclose(ritz.values, np.arange(1.0, N + 1), rtol=0, atol=1e-10 * N)


def test_the_callers_vector_is_left_alone() -> None:
    op = spectral.as_operator(_scaling_matvec, size=N)
    x, X = np.ones(N), np.ones((N, 3))
    op.matvec(x)
    op.matmat(X)
    spectral.as_operator(_ScalingOperator()).matmat(X)
    assert np.all(x == 1.0) and np.all(X == 1.0)

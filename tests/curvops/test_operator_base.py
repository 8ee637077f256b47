"""CurvatureOperator base class: constructor contract, public products, scipy interop."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from curvops import CurvatureOperator, Dense, Diagonal
from curvops.structured import Identity


class CountingSym(CurvatureOperator):
    """Minimal subclass obeying the contract: only ``_matmat_torch``."""

    def __init__(self, M: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        n = M.shape[0]
        super().__init__(
            shape=(n, n),
            dtype=np.dtype(str(dtype).removeprefix("torch.")),
            device=torch.device("cpu"),
            torch_dtype=dtype,
            symmetric=True,
            psd=False,
        )
        self.M = torch.as_tensor(M, dtype=dtype)
        self.calls = 0
        self.columns: list[int] = []

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        assert X.dtype == self.torch_dtype and X.ndim == 2
        self.calls += 1
        self.columns.append(X.shape[1])
        return self.M @ X


def sym(n: int, seed: int = 0) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((n, n))
    return (A + A.T) / 2


def test_subclass_contract_and_no_probe() -> None:
    op = CountingSym(sym(6))
    assert isinstance(op, sla.LinearOperator)
    assert op.dtype == np.float64 and op.torch_dtype == torch.float64
    assert op.shape == (6, 6) and op.device == torch.device("cpu")
    assert op.calls == 0  # declared dtype: no probe product at construction
    assert sla.aslinearoperator(op) is op
    assert op.calls == 0


def test_abstract_method_required() -> None:
    class Missing(CurvatureOperator):
        pass

    with pytest.raises(TypeError):
        Missing(shape=(2, 2), dtype=np.float64)  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"shape": (2, -1), "dtype": np.float64}, ValueError),
        ({"shape": (2,), "dtype": np.float64}, ValueError),
        ({"shape": (2, 2)}, ValueError),
        ({"shape": (2, 2), "dtype": np.complex128}, TypeError),
        ({"shape": (2, 2), "dtype": np.int64}, TypeError),
        ({"shape": (2, 2), "dtype": np.float32, "torch_dtype": torch.float64}, ValueError),
        ({"shape": (2, 3), "dtype": np.float64, "symmetric": True}, ValueError),
        ({"shape": (2, 2), "dtype": np.float64, "psd": True}, ValueError),
    ],
)
def test_constructor_validation(kwargs: dict, exc: type[Exception]) -> None:
    class Z(CurvatureOperator):
        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            return X

    with pytest.raises(exc, match="Argument"):
        Z(**kwargs)


def test_dtype_derivation_either_way() -> None:
    class Z(CurvatureOperator):
        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            return X

    assert Z(shape=(2, 2), torch_dtype=torch.float32).dtype == np.float32
    assert Z(shape=(2, 2), dtype="float16").torch_dtype == torch.float16


def test_read_only_state() -> None:
    op = Diagonal([1.0, 2.0])
    for name in ("shape", "dtype", "device", "torch_dtype", "symmetric", "psd"):
        with pytest.raises(AttributeError):
            setattr(op, name, None)


def test_public_product_shapes() -> None:
    M = sym(5)
    op = CountingSym(M)
    x = np.arange(5.0)
    assert op.matvec(x).shape == (5,)
    assert op.matvec(x[:, None]).shape == (5, 1)
    np.testing.assert_allclose(op @ x, M @ x, rtol=1e-14)
    np.testing.assert_allclose(op(x), M @ x, rtol=1e-14)
    np.testing.assert_allclose(op.dot(x), M @ x, rtol=1e-14)
    np.testing.assert_allclose(op * x, M @ x, rtol=1e-14)
    X = np.random.default_rng(1).standard_normal((5, 3))
    np.testing.assert_allclose(op.matmat(X), M @ X, rtol=1e-13)
    np.testing.assert_allclose(op @ X, M @ X, rtol=1e-13)
    np.testing.assert_allclose(x @ op, x @ M, rtol=1e-13)
    np.testing.assert_allclose(X.T @ op, X.T @ M, rtol=1e-13)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_np_matrix_stays_matrix() -> None:
    op = Diagonal([1.0, 2.0])
    assert isinstance(op.matvec(np.asmatrix([[1.0], [1.0]])), np.matrix)


def test_matmat_is_one_batched_product() -> None:
    op = CountingSym(sym(5))
    op.matmat(np.ones((5, 4)))
    assert op.columns == [4]


def test_matvec_matches_matmat() -> None:
    # Same maths; BLAS gemv and gemm may round differently, so compare to a few ulps.
    op = CountingSym(sym(7))
    X = np.random.default_rng(2).standard_normal((7, 3))
    Y = op.matmat(X)
    for j in range(3):
        np.testing.assert_allclose(op.matvec(X[:, j]), Y[:, j], rtol=0, atol=1e-14 * 7 * 4)


def test_bad_shapes_raise_clear_errors() -> None:
    op = CountingSym(sym(4))
    with pytest.raises(ValueError, match=r"Argument 'x'.*shape \(4,\)"):
        op.matvec(np.ones(3))
    with pytest.raises(ValueError, match="Argument 'X'"):
        op.matmat(np.ones(4))
    with pytest.raises(ValueError, match="Argument 'X'"):
        op.matmat(np.ones((3, 2)))
    with pytest.raises(ValueError, match="use \\* for scalars"):
        op @ 2.0
    with pytest.raises(TypeError, match="shift"):
        op + 1.0


def test_wrong_result_shape_from_subclass() -> None:
    class Bad(CurvatureOperator):
        def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
            return X[:-1]

    with pytest.raises(RuntimeError, match="returned shape"):
        Bad(shape=(3, 3), dtype=np.float64) @ np.ones(3)


def test_symmetric_adjoint_is_self_and_dot_test() -> None:
    op = CountingSym(sym(6))
    assert op.T is op and op.H is op and op.adjoint() is op and op.transpose() is op
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal(6), rng.standard_normal(6)
    assert abs(u @ (op @ v) - v @ (op.T @ u)) <= 1e-12 * np.linalg.norm(u) * np.linalg.norm(v)
    np.testing.assert_array_equal(op.rmatvec(u), op.matvec(u))


def test_non_symmetric_adjoint() -> None:
    M = np.random.default_rng(4).standard_normal((3, 5))
    op = Dense(M)
    assert not op.symmetric
    np.testing.assert_allclose(op.T @ np.ones(3), M.T @ np.ones(3), rtol=1e-14)
    np.testing.assert_allclose(op.rmatvec(np.ones(3)), M.T @ np.ones(3), rtol=1e-14)
    np.testing.assert_allclose(op.H.matmat(np.eye(3)), M.T, rtol=1e-14)
    assert op.T.T is op
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal(3), rng.standard_normal(5)
    assert abs(u @ (op @ v) - v @ (op.T @ u)) <= 1e-12 * np.linalg.norm(u) * np.linalg.norm(v)


def test_template_vector_and_to_dense() -> None:
    op = Diagonal(np.array([1.0, 2.0], dtype=np.float32))
    t = op.template_vector()
    assert t.shape == (2,) and t.dtype == torch.float32 and not t.any()
    torch.testing.assert_close(op.to_dense(), torch.diag(torch.tensor([1.0, 2.0])))


def test_to_base_values_types_and_order() -> None:
    op = -Diagonal([1.0, 2.0]).shift(-3.0)  # 3 I - D
    a, b, base = op.affine_decomposition()
    assert (a, b) == (-1.0, 3.0)
    assert isinstance(base, Diagonal)
    np.testing.assert_array_equal(op.to_base_values(np.array([1.0, 2.0])), [2.0, 1.0])
    assert torch.equal(op.to_base_values(torch.tensor([1.0])), torch.tensor([2.0]))
    assert op.to_base_values(2.5) == 0.5
    with pytest.raises(ValueError, match="non-zero scale"):
        (0.0 * Diagonal([1.0])).to_base_values(1.0)


def test_repr_mentions_flags() -> None:
    assert "psd" in repr(Identity(3)) and "3x3 Identity" in repr(Identity(3))


# ------------------------------------------------------------------ scipy solvers run directly
N = 40


@pytest.fixture(scope="module")
def spectrum_matrix() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    evals = np.concatenate([np.linspace(-4.0, -0.5, N // 2), np.linspace(0.5, 9.0, N // 2)])
    return Q @ np.diag(evals) @ Q.T, evals


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_direct(spectrum_matrix: tuple[np.ndarray, np.ndarray], which: str) -> None:
    A, evals = spectrum_matrix
    op = CountingSym(A)
    vals = sla.eigsh(op, k=3, which=which, tol=1e-12, return_eigenvectors=False)
    ref = evals[-3:] if which == "LA" else evals[:3]
    np.testing.assert_allclose(np.sort(vals), ref, atol=1e-9)


def test_eigsh_on_negated_shift_maps_back(spectrum_matrix: tuple[np.ndarray, np.ndarray]) -> None:
    A, evals = spectrum_matrix
    op = -Dense(A, symmetric=True).shift(-10.0)  # 10 I - A: bottom of A becomes top
    vals = sla.eigsh(op, k=2, which="LA", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(op.to_base_values(vals)), evals[:2], atol=1e-9)


def test_lobpcg_direct(spectrum_matrix: tuple[np.ndarray, np.ndarray]) -> None:
    A, evals = spectrum_matrix
    op = CountingSym(A)
    X0 = np.random.default_rng(8).standard_normal((N, 3))
    vals, _ = sla.lobpcg(op, X0, largest=True, tol=1e-10, maxiter=500)
    np.testing.assert_allclose(np.sort(vals), evals[-3:], atol=1e-7)
    assert max(op.columns) > 1  # lobpcg used batched products


def test_cg_on_damp_and_minres_on_shift(spectrum_matrix: tuple[np.ndarray, np.ndarray]) -> None:
    A, _ = spectrum_matrix
    b = np.random.default_rng(9).standard_normal(N)
    G = Dense(A @ A.T, symmetric=True, psd=True)
    damped = G.damp(0.5)
    x, info = sla.cg(damped, b, rtol=1e-12, maxiter=1000)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(A @ A.T + 0.5 * np.eye(N), b), atol=1e-8)
    shifted = Dense(A, symmetric=True).shift(0.25)
    x, info = sla.minres(shifted, b, rtol=1e-12, maxiter=1000)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(A + 0.25 * np.eye(N), b), atol=1e-8)


def test_spectral_lanczos_runs_in_torch_and_maps_back() -> None:
    from spectral.krylov import lanczos

    A = sym(30, seed=12)
    op = -Dense(A).shift(-3.0)  # 3 I - A
    result = lanczos(op, 30, seed=0)
    assert isinstance(result.basis, torch.Tensor)  # vectors stayed in torch (template_vector)
    values = np.sort(op.to_base_values(result.ritz().values))
    np.testing.assert_allclose(values, np.linalg.eigvalsh(A), atol=1e-10)

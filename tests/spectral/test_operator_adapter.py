"""as_operator: dense arrays, LinearOperators, sparse matrices, callables, the template protocol."""

from __future__ import annotations

from typing import Any

import array_api_strict
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from spectral import SymmetricOperator, as_operator, lanczos, random_probe, random_probes
from tests.spectral.strategies import single_threaded_blas  # noqa: F401 (autouse fixture)

D = np.array([1.0, 2.0, 3.0, 4.0])


def test_dense_arrays_keep_their_namespace_and_dtype() -> None:
    for A in (np.diag(D), torch.diag(torch.from_numpy(D)), array_api_strict.asarray(np.diag(D))):
        op = as_operator(A)
        assert op.n == 4 and op.shape == (4, 4)
        assert type(op.template) is type(A)
        assert op.dtype == A.dtype
        y = op.matvec(op.template + 1.0)
        assert type(y) is type(A)
        X = op.matmat(A)
        assert tuple(X.shape) == (4, 4)
    op32 = as_operator(np.diag(D).astype(np.float32))
    assert op32.dtype == np.float32
    assert as_operator(np.eye(3, dtype=np.int64)).dtype == np.float64


def test_scipy_linear_operator_and_sparse() -> None:
    lin = spla.LinearOperator((4, 4), matvec=lambda x: D * x.ravel(), dtype=None)
    op = as_operator(lin)
    assert op.dtype == np.float64
    np.testing.assert_allclose(op.matvec(np.ones(4)), D)
    np.testing.assert_allclose(op.matmat(np.eye(4)), np.diag(D))
    lin32 = spla.aslinearoperator(np.diag(D).astype(np.float32))
    assert as_operator(lin32).dtype == np.float32
    sparse = sp.diags(D).tocsr()
    op = as_operator(sparse)
    np.testing.assert_allclose(op.matvec(np.ones(4)), D)
    res = lanczos(sparse, 4, seed=0)
    np.testing.assert_allclose(res.ritz().values, D, atol=1e-12)


class TemplateOperator:
    """A curvops-like operator that wants float32 vectors (protocol: template_vector())."""

    shape = (4, 4)
    dtype = np.float64  # deliberately different: the template wins
    symmetric = True

    def template_vector(self) -> np.ndarray:
        return np.zeros(4, dtype=np.float32)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32
        return (D * x).astype(np.float32)


def test_template_vector_protocol() -> None:
    op = as_operator(TemplateOperator())
    assert op.dtype == np.float32
    res = lanczos(TemplateOperator(), 4, seed=0)
    assert res.basis.dtype == np.float32
    np.testing.assert_allclose(res.ritz().values, D, rtol=1e-5)
    # matmat falls back to column products
    np.testing.assert_allclose(op.matmat(np.eye(4, dtype=np.float32)), np.diag(D))


def test_callables_with_size_and_template() -> None:
    op = as_operator(lambda x: 2.0 * x, size=5)
    assert op.n == 5 and op.dtype == np.float64
    t = torch.zeros(5, dtype=torch.float64)
    op_t = as_operator(lambda x: 2.0 * x, size=5, like=t)
    assert isinstance(op_t.matvec(t + 1.0), torch.Tensor)
    res = lanczos(op_t, 1, seed=0)
    assert isinstance(res.basis, torch.Tensor)
    assert res.alpha.tolist() == pytest.approx([2.0])
    assert as_operator(op) is op
    assert isinstance(op, SymmetricOperator) and "n=5" in repr(op)


class NonSymmetric:
    shape = (3, 3)
    dtype = np.float64
    symmetric = False

    def matvec(self, x: Any) -> Any:
        return x


@pytest.mark.parametrize(
    ("A", "size", "kind", "match"),
    [
        (np.ones((3, 4)), None, ValueError, "square"),
        (np.ones(3), None, ValueError, "square"),
        (np.ones((0, 0)), None, ValueError, "n >= 1"),
        (np.eye(3) * 1j, None, TypeError, "real"),
        (lambda x: x, None, TypeError, "size"),
        (lambda x: x, 0, ValueError, "size"),
        (lambda x: x, 2.5, ValueError, "size"),
        (np.eye(3), 4, ValueError, "size"),
        (NonSymmetric(), None, ValueError, "symmetric"),
        ("not an operator", None, TypeError, "A"),
    ],
)
def test_bad_operators_are_refused(A: Any, size: Any, kind: type[Exception], match: str) -> None:
    with pytest.raises(kind, match=match):
        as_operator(A, size)


def test_probe_kinds_and_validation() -> None:
    rng = np.random.default_rng(0)
    v = random_probe(1000, "rademacher", rng)
    assert set(np.unique(v)) == {-1.0, 1.0}
    g = random_probes(1000, 4, "gaussian", rng=np.random.default_rng(1))
    assert g.shape == (1000, 4) and abs(float(np.mean(g))) < 0.1
    s = random_probes(10, 2, "sphere", seed=2)
    np.testing.assert_allclose(np.linalg.norm(s, axis=0), 1.0)
    # a Generator is advanced: two draws differ; an int seed repeats
    assert not np.array_equal(random_probe(5, "gaussian", rng), random_probe(5, "gaussian", rng))
    np.testing.assert_array_equal(random_probe(5, seed=3), random_probe(5, seed=3))
    like = torch.zeros(3, dtype=torch.float32)
    assert random_probe(3, "gaussian", 0, like).dtype == torch.float32
    with pytest.raises(ValueError, match="kind"):
        random_probe(3, "uniform")
    with pytest.raises(ValueError, match="'n'"):
        random_probe(0)
    with pytest.raises(ValueError, match="'k'"):
        random_probes(3, 0)
    with pytest.raises(TypeError, match="seed"):
        random_probe(3, seed="abc")  # type: ignore[arg-type]


class NoDtype:
    """Duck-typed operator without a ``dtype`` attribute (and one with ``dtype = None``)."""

    shape = (4, 4)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return D * x


class NoneDtype(NoDtype):
    dtype = None


def test_operators_without_dtype_default_to_float64() -> None:
    for A in (NoDtype(), NoneDtype()):
        op = as_operator(A)
        assert op.dtype == np.float64 and type(op.template) is np.ndarray
        res = lanczos(A, 4, seed=0)
        assert res.breakdown
        np.testing.assert_allclose(res.ritz().values, D, atol=1e-12)
    # an integer-typed LinearOperator computes in float64
    lin = spla.LinearOperator((4, 4), matvec=lambda x: D * x, dtype=np.int64)
    assert as_operator(lin).dtype == np.float64
    with pytest.raises(TypeError, match="real"):
        as_operator(spla.LinearOperator((4, 4), matvec=lambda x: x, dtype=np.complex128))


def _rotated(n: int, dtype: Any, seed: int = 0) -> np.ndarray:
    """``Q diag(s) Q^T`` formed in ``dtype``: symmetric only up to rounding."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    Q = Q.astype(dtype)
    return (Q * rng.uniform(-3, 3, n).astype(dtype)) @ Q.T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [5, 513, 700])  # one block, a block boundary, two blocks
def test_dense_matrices_symmetric_up_to_rounding_are_accepted(n: int, dtype: Any) -> None:
    A = _rotated(n, dtype)
    assert not np.array_equal(A, A.T)  # gemm rounding: not bitwise symmetric
    assert as_operator(A).n == n


@pytest.mark.parametrize("namespace", ["numpy", "torch", "array_api_strict"])
def test_non_symmetric_dense_matrices_are_refused(namespace: str) -> None:
    """On a non-symmetric matrix the Lanczos recurrence ran without an error and returned
    Ritz values of no matrix."""
    A = _rotated(40, np.float64)
    A[3, 17] += 1e-5 * np.abs(A).max()  # a finite-difference Hessian's asymmetry
    if namespace == "torch":
        M: Any = torch.from_numpy(A)
    elif namespace == "array_api_strict":
        M = array_api_strict.asarray(A)
    else:
        M = A
    with pytest.raises(ValueError, match=r"'A': expected a symmetric matrix.*\(A \+ A\.T\) / 2"):
        as_operator(M)
    with pytest.raises(ValueError, match=r"max\|A - A\^T\| = "):
        lanczos(M, 10, seed=0)
    assert as_operator((A + A.T) / 2).n == 40


def test_non_finite_dense_matrix_is_left_to_the_products() -> None:
    """NaN entries are reported by the algorithms with the iteration where they appear."""
    A = _rotated(6, np.float64)
    A[2, 4] = np.nan
    assert as_operator(A).n == 6


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_non_symmetric_sparse_matrices_are_refused(fmt: str) -> None:
    A = sp.random(50, 50, density=0.1, random_state=0, format=fmt)
    S = (A + A.T).asformat(fmt)
    assert as_operator(S).n == 50
    with pytest.raises(ValueError, match=r"'A': expected a symmetric matrix.*sparse matrix"):
        as_operator(A)
    with pytest.raises(ValueError, match="expected a symmetric matrix"):
        lanczos(A, 5, seed=0)
    assert as_operator(sp.csr_matrix((50, 50))).n == 50  # no stored entry


A10 = np.diag(np.arange(1.0, 11.0))


@pytest.mark.parametrize(
    ("product", "kind", "received"),
    [
        (lambda x: (A10 @ x)[:-1], ValueError, "numpy.ndarray of shape (9,)"),
        (lambda x: None, TypeError, "None"),
        (lambda x: list(A10 @ x), TypeError, "[np.float64("),
        (lambda x: torch.tensor(A10 @ x), TypeError, "torch.Tensor of shape (10,)"),
    ],
)
def test_products_of_the_wrong_length_or_type_are_refused(
    product: Any, kind: type[Exception], received: str
) -> None:
    """Before: "cannot reshape array of size 9 into shape (10,)", AttributeError on
    ``None.shape``, a TypeError from ``numpy @ Tensor``, naming nothing."""
    expected = "Argument 'A': expected an operator whose products are numpy.ndarray arrays"
    with pytest.raises(kind, match=expected) as info:
        lanczos(as_operator(product, size=10), 3, seed=0)
    assert f"received {received}" in str(info.value)
    op = as_operator(spla.LinearOperator((10, 10), matvec=lambda x: x, matmat=lambda X: X[:-1]))
    with pytest.raises(ValueError, match=r"products are numpy.ndarray arrays of shape \(10, 2\)"):
        op.matmat(np.ones((10, 2)))


@pytest.mark.parametrize(
    ("A", "like", "kind", "match"),
    [
        (sp.csr_matrix(np.array([[2, 1j], [-1j, 2]])), None, TypeError, "'A'.*complex"),
        (spla.aslinearoperator(np.eye(2) * 1j), None, TypeError, "'A'.*complex .*not supported"),
        (lambda x: 2 * x, np.zeros(2, dtype=int), TypeError, "'like'.*real floating"),
        (lambda x: 2 * x, [0.0, 0.0], TypeError, "'like'.*an array"),
        (sp.eye(2, format="csr"), np.zeros(2, dtype=bool), TypeError, "'like'"),
        (spla.aslinearoperator(np.eye(2)), np.zeros(2, dtype=complex), TypeError, "'like'"),
    ],
)
def test_complex_operators_and_bad_templates_are_refused(
    A: Any, like: Any, kind: type[Exception], match: str
) -> None:
    """A complex Hermitian sparse matrix was called "not symmetric, max|A - A^T| = 2", and an
    integer ``like`` failed later with an AttributeError blamed on 'v0'."""
    with pytest.raises(kind, match=f"Argument {match}"):
        lanczos(as_operator(A, 2, like=like), 2, seed=0)


def test_negative_seeds_are_refused_by_name() -> None:
    for call in (
        lambda: lanczos(np.eye(3), 2, seed=-1),
        lambda: random_probe(3, seed=-1),
        lambda: random_probes(3, 2, seed=np.int64(-5)),
    ):
        with pytest.raises(ValueError, match="Argument 'seed': expected None, a non-negative"):
            call()

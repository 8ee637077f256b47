"""K-FAC and E-KFAC on singular curvatures: zero eigenvalues are 0, not rounding noise.

Each case is singular in exact arithmetic through a factor's null space:

* ``ce-mlp``: a cross-entropy output layer, whose output factor :math:`G` has the null
  vector :math:`\\mathbf 1` (softmax Hessians annihilate it);
* ``wide-input``: a first layer with more inputs (8) than samples (3): :math:`A` has rank 3;
* ``duplicate-feature``: an input column repeated: :math:`A (e_0 - e_3) = 0`.

``eigh`` returns those zeros as noise of either sign (:math:`\\pm 10^{-19}` for K-FAC,
:math:`10^{-36}` for E-KFAC's sums of squares); the seeds below give positive noise,
negative noise and both (:func:`test_the_cases_have_rounding_noise_of_both_signs`).
References are dense float64 matrices built independently of the operators' eigenvalues:
K-FAC from its factors (:math:`\\bigoplus G \\otimes A`), E-KFAC as
:math:`U \\operatorname{diag}(\\operatorname{diag}(U^\\top C U)) U^\\top` with the exact GGN
:math:`C` (:func:`curvops.testing.dense_ggn`) and the K-FAC eigenbases :math:`U`.  The
operators' documented behaviour for a singular matrix: ``logdet() == -inf`` and
``inverse(0.0)`` a ``ValueError`` naming ``damping`` (no pseudo-inverse), like the exact
:class:`curvops.Dense` (:func:`curvops.structure.exact_inverse`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import EKFACOperator, KFACOperator
from curvops.kfac import KroneckerEigenOperator
from curvops.structure import exact_inverse
from curvops.structured import Dense
from curvops.testing import dense_ggn

DT = torch.float64
EPS = float(torch.finfo(DT).eps)

#: (construction, seed) -> the signs of K-FAC's rounding noise on the null eigenvalues (x86)
NOISE_SIGNS = {
    ("ce-mlp", 0): {-1.0},
    ("ce-mlp", 1): {1.0},
    ("wide-input", 0): {-1.0, 1.0},
    ("duplicate-feature", 0): {1.0},
    ("duplicate-feature", 3): {-1.0},
}
CASES = list(NOISE_SIGNS)


def _net(sizes: tuple[int, int, int], g: torch.Generator, dtype: torch.dtype) -> nn.Module:
    net = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return net.to(dtype)


def _case(kind: str, seed: int, dtype: torch.dtype = DT) -> tuple[nn.Module, nn.Module, Any]:
    g = torch.Generator().manual_seed(seed)
    if kind == "ce-mlp":
        net = _net((4, 6, 3), g, dtype)
        x = torch.randn(12, 4, generator=g, dtype=torch.float64).to(dtype)
        return net, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (12,), generator=g))
    if kind == "wide-input":
        net = _net((8, 5, 2), g, dtype)
        x = torch.randn(3, 8, generator=g, dtype=dtype)
        return net, nn.MSELoss(), (x, torch.randn(3, 2, generator=g, dtype=dtype))
    assert kind == "duplicate-feature"
    net = _net((4, 5, 2), g, dtype)
    x = torch.randn(20, 4, generator=g, dtype=dtype)
    x[:, 3] = x[:, 0]
    return net, nn.MSELoss(), (x, torch.randn(20, 2, generator=g, dtype=dtype))


def _kfac_reference(K: KFACOperator) -> np.ndarray:
    """:math:`\\bigoplus_b G_b \\otimes A_b` from the factors, in float64."""
    n = K.shape[0]
    dense = np.zeros((n, n))
    for block, (G, A) in zip(K.blocks, K.factors()):
        pos = block.positions.reshape(-1).numpy()
        dense[np.ix_(pos, pos)] = np.kron(G.double().numpy(), A.double().numpy())
    return dense


def _ekfac_reference(E: EKFACOperator, net: nn.Module, loss_fn: nn.Module, data: Any) -> np.ndarray:
    """:math:`U \\operatorname{diag}(\\operatorname{diag}(U^\\top C U)) U^\\top` per block."""
    C = dense_ggn(net, loss_fn, data).numpy()
    n = E.shape[0]
    dense = np.zeros((n, n))
    for block, (G, A) in zip(E.blocks, E.factors()):
        pos = block.positions.reshape(-1).numpy()
        U = np.kron(
            torch.linalg.eigh(G).eigenvectors.numpy(), torch.linalg.eigh(A).eigenvectors.numpy()
        )
        values = np.einsum("ij,ik,kj->j", U, C[np.ix_(pos, pos)], U)
        dense[np.ix_(pos, pos)] = (U * values) @ U.T
    return dense


def _operator_and_reference(cls: type, kind: str, seed: int) -> tuple[Any, np.ndarray]:
    net, loss_fn, data = _case(kind, seed)
    op = cls(net, loss_fn, data)
    if cls is KFACOperator:
        return op, _kfac_reference(op)
    return op, _ekfac_reference(op, net, loss_fn, data)


def test_the_cases_have_rounding_noise_of_both_signs() -> None:
    """The raw eigh products on the null space are noise, positive in some cases, negative
    in others (per case as in ``NOISE_SIGNS`` with OpenBLAS/MKL on x86; the signs may
    differ with another LAPACK, so only their union is asserted).

    The old exact-zero tests (``<= 0``, ``> 0``) gave a finite log-det and a 1e18-sized
    inverse for positive noise, ``-inf`` and a ``NumericalError`` for negative noise.
    """
    signs = set()
    for kind, seed in CASES:
        K = KFACOperator(*_case(kind, seed))
        for G, A in K.factors():
            raw = torch.outer(torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(A)).reshape(-1)
            floor = (G.shape[0] + A.shape[0]) * EPS * float(raw.abs().max())
            noise = raw[raw.abs() <= floor]
            assert bool((noise != 0).all())  # noise, not exact zeros: the case tests something
            signs |= {float(torch.sign(v)) for v in noise}
    assert signs == {-1.0, 1.0}


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_zero_eigenvalues_are_zero_and_the_rank_is_the_dense_rank(
    cls: type, kind: str, seed: int
) -> None:
    op, ref = _operator_and_reference(cls, kind, seed)
    rank = int(np.linalg.matrix_rank(ref))
    assert rank < op.shape[0]  # singular
    values = op.eigenvalues()
    assert int((values != 0).sum()) == rank
    assert float(values.min()) == 0.0  # psd: no negative noise either
    want = np.linalg.eigvalsh(ref)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(values.numpy(), want, rtol=0, atol=100 * op.shape[0] * EPS * scale)
    # the products and the assembled matrix are the reference matrix
    np.testing.assert_allclose(op.to_dense().numpy(), ref, rtol=0, atol=1e-13 * scale)
    eye = torch.eye(op.shape[0], dtype=DT)
    np.testing.assert_allclose((op @ eye).numpy(), ref, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_logdet_of_a_singular_operator_is_minus_infinity(cls: type, kind: str, seed: int) -> None:
    op, ref = _operator_and_reference(cls, kind, seed)
    assert np.linalg.matrix_rank(ref) < ref.shape[0]
    assert op.logdet() == -math.inf


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_undamped_inverse_of_a_singular_operator_is_an_error_naming_damping(
    cls: type, kind: str, seed: int
) -> None:
    op, ref = _operator_and_reference(cls, kind, seed)
    with pytest.raises(ValueError, match=r"'damping'.*singular"):
        op.inverse(0.0)
    # a damping below the rounding level of the zero eigenvalues resolves nothing either
    with pytest.raises(ValueError, match=r"'damping'.*increase the damping"):
        op.inverse(1e-300)
    # as the exact Dense operator does with the same matrix
    with pytest.raises(ValueError, match="nonsingular"):
        exact_inverse(Dense(ref, symmetric=True), 0.0)


@pytest.mark.parametrize(("kind", "seed"), CASES)
def test_pi_damped_inverse_without_damping_is_an_error_naming_damping(kind: str, seed: int) -> None:
    K = KFACOperator(*_case(kind, seed))
    with pytest.raises(ValueError, match="'damping'"):
        K.inverse(0.0, pi_damping=True)
    K.inverse(1e-2, pi_damping=True)  # damped factors are nonsingular


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize(("kind", "seed"), CASES)
@pytest.mark.parametrize("relative_damping", [1e-2, 1e-6])
def test_damped_inverse_and_its_logdet_equal_the_dense_solve(
    cls: type, kind: str, seed: int, relative_damping: float
) -> None:
    op, ref = _operator_and_reference(cls, kind, seed)
    n = op.shape[0]
    delta = relative_damping * float(np.abs(np.linalg.eigvalsh(ref)).max())
    damped = ref + delta * np.eye(n)
    V = np.random.default_rng(seed).standard_normal((n, 3))
    want = np.linalg.solve(damped, V)
    inv = op.inverse(delta)
    got = inv @ V
    cond = np.linalg.cond(damped)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 100 * n * EPS * cond, (err, cond)
    sign, logabs = np.linalg.slogdet(damped)
    assert sign == 1.0
    assert math.isclose(inv.logdet(), -logabs, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(op.damp(delta).to_dense().logdet().item(), logabs, rel_tol=1e-9)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_float32_singular_operator(cls: type) -> None:
    net, loss_fn, data = _case("ce-mlp", 0, dtype=torch.float32)
    op = cls(net, loss_fn, data)
    values = op.eigenvalues()
    assert values.dtype == torch.float32
    assert int((values == 0).sum()) == 7  # the null vector 1 of G: 6 weight + 1 bias direction
    assert op.logdet() == -math.inf
    with pytest.raises(ValueError, match="'damping'"):
        op.inverse(0.0)
    ref = op.to_dense().double().numpy()
    delta = 1e-2 * float(values.max())
    v = np.ones(op.shape[0], dtype=np.float32)
    want = np.linalg.solve(ref + delta * np.eye(op.shape[0]), v.astype(np.float64))
    np.testing.assert_allclose(
        op.inverse(delta) @ v, want, rtol=1e-3, atol=1e-3 * np.abs(want).max()
    )


def test_an_inverse_follows_a_model_that_becomes_singular() -> None:
    """The check is repeated when the factors change: a product then raises, naming damping."""
    g = torch.Generator().manual_seed(1)
    net = _net((4, 5, 2), g, DT)
    x, y = torch.randn(12, 4, generator=g, dtype=DT), torch.randn(12, 2, generator=g, dtype=DT)
    K = KFACOperator(net, nn.MSELoss(), (x, y))  # 12 samples > 5 inputs: nonsingular
    assert K.logdet() > -math.inf
    inv = K.inverse(0.0)
    v = torch.ones(K.shape[0], dtype=DT)
    inv @ v
    with torch.no_grad():
        net[0].weight.zero_()  # tanh(b): the second layer's inputs are one repeated row
        net[0].bias.fill_(0.3)
    assert isinstance(K, KroneckerEigenOperator) and K.logdet() == -math.inf
    with pytest.raises(ValueError, match=r"'damping'.*singular"):
        inv @ v

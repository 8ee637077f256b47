"""check_operator_contract run on an instance of every public operator class.

The model operators (Hessian, GGN, Fisher) run it in their own test files on the
full case matrix; here every structured, algebra and inverse class runs it too, each
built from small dense matrices (or a tiny model) whose dense reference is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import curvops
from curvops import (
    Adjoint,
    Affine,
    BlockDiagonal,
    CurvatureOperator,
    Dense,
    Diagonal,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    Identity,
    InverseOperator,
    LowRank,
    Power,
    Product,
    Projected,
    Scaled,
    Sum,
    inverse,
    per_layer,
)
from curvops.testing import check_operator_contract, dense_ggn, dense_hessian

from .conftest import make_cnn, make_inputs, make_targets

N = 6


def _sym(seed: int) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((N, N))
    return (A + A.T) / 2


def _spd(seed: int) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((N, N))
    return A @ A.T / N + np.eye(N)


def _nonsym(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, N))


def _identity() -> tuple[CurvatureOperator, np.ndarray]:
    return Identity(N), np.eye(N)


def _diagonal() -> tuple[CurvatureOperator, np.ndarray]:
    d = np.random.default_rng(1).standard_normal(N)
    return Diagonal(d), np.diag(d)


def _dense_sym() -> tuple[CurvatureOperator, np.ndarray]:
    return Dense(_sym(2)), _sym(2)


def _dense_nonsym() -> tuple[CurvatureOperator, np.ndarray]:
    return Dense(_nonsym(3)), _nonsym(3)


def _lowrank() -> tuple[CurvatureOperator, np.ndarray]:
    U = np.random.default_rng(4).standard_normal((N, 2))
    s = np.array([2.0, -0.5])
    return LowRank(U, s), U @ np.diag(s) @ U.T


def _affine() -> tuple[CurvatureOperator, np.ndarray]:
    return Affine(Dense(_sym(5)), -2.0, 0.3), -2.0 * _sym(5) + 0.3 * np.eye(N)


def _scaled() -> tuple[CurvatureOperator, np.ndarray]:
    return Scaled(Dense(_spd(6), symmetric=True, psd=True), 3.0), 3.0 * _spd(6)


def _sum() -> tuple[CurvatureOperator, np.ndarray]:
    return Sum([Dense(_sym(7)), Dense(_nonsym(8))]), _sym(7) + _nonsym(8)


def _product() -> tuple[CurvatureOperator, np.ndarray]:
    return Product([Dense(_nonsym(9)), Dense(_sym(10))]), _nonsym(9) @ _sym(10)


def _power() -> tuple[CurvatureOperator, np.ndarray]:
    return Power(Dense(_sym(11)), 3), np.linalg.matrix_power(_sym(11), 3)


def _projected() -> tuple[CurvatureOperator, np.ndarray]:
    V, _ = np.linalg.qr(np.random.default_rng(12).standard_normal((N, 2)))
    P = np.eye(N) - V @ V.T
    return Projected(Dense(_sym(13)), V), P @ _sym(13) @ P


def _block_diagonal() -> tuple[CurvatureOperator, np.ndarray]:
    A = _sym(14)[:2, :2]
    B = _spd(15)[:4, :4]
    M = np.zeros((N, N))
    M[:2, :2], M[2:, 2:] = A, B
    return BlockDiagonal([Dense(A), Dense(B, symmetric=True, psd=True)]), M


def _adjoint() -> tuple[CurvatureOperator, np.ndarray]:
    return Adjoint(Dense(_nonsym(16))), _nonsym(16).T


def _inverse(method: str) -> Callable[[], tuple[CurvatureOperator, np.ndarray]]:
    def build() -> tuple[CurvatureOperator, np.ndarray]:
        M = _spd(17) if method == "cg" else _sym(17) + 4.0 * np.eye(N)
        op = inverse(Dense(M, symmetric=True, psd=method == "cg"), method, tol=1e-14)
        return op, np.linalg.inv(M)

    return build


def _kfac(name: str) -> Callable[[], tuple[CurvatureOperator, np.ndarray]]:
    def build() -> tuple[CurvatureOperator, np.ndarray]:
        net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        data = (x, torch.arange(7) % 2)
        cls = curvops.EKFACOperator if name == "EKFACOperator" else curvops.KFACOperator
        op = cls(net, nn.CrossEntropyLoss(), data)
        if name == "KroneckerInverse":
            op = op.inverse(0.1)
        return op, op.to_dense().numpy()

    return build


BUILDERS: dict[str, Callable[[], tuple[CurvatureOperator, np.ndarray]]] = {
    "Identity": _identity,
    "Diagonal": _diagonal,
    "Dense-symmetric": _dense_sym,
    "Dense-nonsymmetric": _dense_nonsym,
    "LowRank": _lowrank,
    "Affine": _affine,
    "Scaled": _scaled,
    "Sum": _sum,
    "Product": _product,
    "Power": _power,
    "Projected": _projected,
    "BlockDiagonal": _block_diagonal,
    "Adjoint": _adjoint,
    "InverseOperator-cg": _inverse("cg"),
    "InverseOperator-minres": _inverse("minres"),
    "InverseOperator-lanczos": _inverse("lanczos"),
    "KFACOperator": _kfac("KFACOperator"),
    "EKFACOperator": _kfac("EKFACOperator"),
    "KroneckerInverse": _kfac("KroneckerInverse"),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_contract_of_structured_and_algebra_classes(name: str) -> None:
    op, M = BUILDERS[name]()
    expected = name.split("-")[0]
    assert type(op).__name__ == expected
    rtol = 1e-9 if expected == "InverseOperator" else None
    check_operator_contract(op, M, rtol=rtol)


def test_every_public_operator_class_is_covered() -> None:
    """A new public operator class must be added to this file (or the model tests)."""
    model_classes = {"HessianOperator", "GGNOperator", "FisherOperator"}  # test_hessian/ggn/fisher
    bases = {"CurvatureOperator", "ModelCurvatureOperator"}
    public = {
        name
        for name in curvops.__all__
        if isinstance(getattr(curvops, name), type)
        and issubclass(getattr(curvops, name), CurvatureOperator)
    }
    covered = {key.split("-")[0] for key in BUILDERS} | model_classes | bases
    assert public - covered == set()


def test_contract_of_model_operator_algebra_and_inverse() -> None:
    """Model operators inside algebra, per-layer blocks and an inverse, against dense."""
    model = make_cnn()
    data = (make_inputs("cnn", 6), make_targets("ce", 6))
    loss = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss, data, bn_mode="train")
    G = GGNOperator(model, loss, data, bn_mode="eval")
    Hd = dense_hessian(model, loss, data, bn_mode="train").numpy()
    Gd = dense_ggn(model, loss, data, bn_mode="eval").numpy()
    n = Hd.shape[0]
    check_operator_contract(0.5 * H - G.shift(0.1), 0.5 * Hd - Gd - 0.1 * np.eye(n), rtol=1e-10)
    check_operator_contract(
        inverse(G.damp(0.5), "cg", tol=1e-14), np.linalg.inv(Gd + 0.5 * np.eye(n)), rtol=1e-9
    )
    blocks = per_layer(GGNOperator, model, loss, data, bn_mode="eval")
    mask = np.zeros_like(Gd, dtype=bool)
    for lo, hi in zip(blocks.offsets[:-1], blocks.offsets[1:]):
        mask[lo:hi, lo:hi] = True
    check_operator_contract(blocks, np.where(mask, Gd, 0.0), rtol=1e-10)
    F = FisherOperator(model, loss, data, bn_mode="eval", kind="empirical")
    assert isinstance(inverse(F.damp(1.0)), InverseOperator)
    assert torch.equal(torch.as_tensor(H.template_vector()), torch.zeros(n, dtype=torch.float64))

"""The rows and columns of a curvature operator are parameters: operators over
different parameters are not added, multiplied or compared (a K-FAC over '2.weight'
was graded against a Hessian over '0.weight' without an error when the sizes agreed),
while operators over the same names - also of two checkpoints of one architecture -
and operators given as numbers combine as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import curvops
from curvops import (
    Dense,
    Diagonal,
    GGNOperator,
    HessianOperator,
    Identity,
    KFACOperator,
    inverse,
    per_layer,
)
from curvops.algebra import Product, Sum, parameter_names_of

F64 = torch.float64


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 4, generator=g, dtype=F64), torch.randint(0, 4, (10,), generator=g)


def _ops() -> tuple[HessianOperator, GGNOperator, KFACOperator]:
    net, loss, data = _net(), nn.CrossEntropyLoss(), _data()
    return (
        HessianOperator(net, loss, data, params=["0.weight"]),
        GGNOperator(net, loss, data, params=["2.weight"]),
        KFACOperator(net, loss, data, params=["2.weight"]),
    )


def test_names_follow_the_algebra() -> None:
    H, G, K = _ops()
    assert parameter_names_of(H) == ("0.weight",)
    assert parameter_names_of(K) == ("2.weight",)
    for expr in (2.0 * G, -G, G.shift(0.5), G.damp(0.1), G**2, G @ G, G + K, G.T):
        assert parameter_names_of(expr) == ("2.weight",)
    assert parameter_names_of(inverse(G.damp(1.0))) == ("2.weight",)
    assert parameter_names_of(G + Dense(np.eye(16))) == ("2.weight",)
    assert parameter_names_of(Dense(np.eye(16))) is None
    assert parameter_names_of(Diagonal(np.ones(16))) is None
    net, loss, data = _net(), nn.CrossEntropyLoss(), _data()
    blocks = per_layer(HessianOperator, net, loss, data)
    assert parameter_names_of(blocks) == ("0.weight", "0.bias", "2.weight", "2.bias")


@pytest.mark.parametrize(
    "combine",
    [
        lambda H, G: H + G,
        lambda H, G: H - 3.0 * G,
        lambda H, G: H @ G,
        lambda H, G: H.shift(1.0) @ G.damp(0.5),
        lambda H, G: Sum([H, G]),
        lambda H, G: Product([H, H, G]),
        lambda H, G: H + (G + Dense(np.eye(16))),
    ],
)
def test_operators_over_different_parameters_do_not_combine(combine: object) -> None:
    H, G, _ = _ops()
    with pytest.raises(ValueError, match=r"same parameters.*\['0\.weight'\].*\['2\.weight'\]"):
        combine(H, G)  # type: ignore[operator]


def test_compare_refuses_operators_over_different_parameters() -> None:
    H, G, K = _ops()
    with pytest.raises(ValueError, match=r"'approximation'.*same parameters"):
        curvops.compare(K, H)
    with pytest.raises(ValueError, match=r"'approximations\['kfac'\]'.*same parameters"):
        curvops.compare_all({"kfac": K}, H)
    report = curvops.compare(K, G, k=2, num_iters=10, num_probes=2, seed=0)
    assert np.isfinite(report.wasserstein)


def test_two_checkpoints_and_plain_matrices_combine() -> None:
    loss, data = nn.CrossEntropyLoss(), _data()
    H1 = HessianOperator(_net(0), loss, data)
    H2 = HessianOperator(_net(1), loss, data)
    v = torch.randn(H1.shape[0], dtype=F64)
    assert torch.allclose((H1 - H2) @ v, H1 @ v - H2 @ v)
    D = Dense(np.eye(H1.shape[0]))
    assert torch.allclose((H1 + D) @ v, H1 @ v + v)
    assert torch.allclose((H1 + Identity(H1.shape[0], dtype=F64)) @ v, H1 @ v + v)

"""FisherOperator (Monte-Carlo and empirical) against dense per-sample-gradient references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.testing import check_operator_contract, dense_fisher, dense_ggn

from .conftest import (
    CASES,
    Case,
    make_inputs,
    make_mlp,
    make_targets,
    random_columns,
    relative_error,
)


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_fisher_matches_dense(case: Case, kind: str) -> None:
    model, loss, data = case.build()
    F = FisherOperator(model, loss, data, bn_mode=case.bn_mode, kind=kind, mc_samples=2, seed=3)
    D = dense_fisher(model, loss, data, bn_mode=case.bn_mode, kind=kind, mc_samples=2, seed=3)
    X = random_columns(F.num_params)
    assert relative_error(F.matmat(X), D @ X) <= 1e-10


@pytest.mark.parametrize("case", [CASES[0], CASES[7]], ids=lambda c: c.id)
def test_fisher_contract(case: Case) -> None:
    model, loss, data = case.build()
    F = FisherOperator(model, loss, data, bn_mode=case.bn_mode, kind="mc", seed=1)
    D = dense_fisher(model, loss, data, bn_mode=case.bn_mode, kind="mc", seed=1)
    check_operator_contract(F, D, rtol=1e-10)


def test_empirical_fisher_is_mean_outer_product_of_per_sample_gradients() -> None:
    model = make_mlp()
    x, y = make_inputs("mlp", 5), make_targets("ce", 5)
    F = FisherOperator(model, nn.CrossEntropyLoss(), (x, y), kind="empirical").to_dense()
    grads = []
    for i in range(5):
        model.zero_grad()
        nn.CrossEntropyLoss()(model.eval()(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    G = torch.stack(grads)
    assert relative_error(F, G.T @ G / 5) <= 1e-12


def test_mc_fisher_is_seeded_and_converges_to_ggn() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 6), make_targets("ce", 6))
    a = FisherOperator(model, nn.CrossEntropyLoss(), data, mc_samples=1, seed=5)
    b = FisherOperator(model, nn.CrossEntropyLoss(), data, mc_samples=1, seed=5)
    c = FisherOperator(model, nn.CrossEntropyLoss(), data, mc_samples=1, seed=6)
    x = random_columns(a.num_params, 1)[:, 0]
    assert torch.equal(a @ x, b @ x)
    assert torch.equal(a @ x, a @ x)
    assert not torch.equal(a @ x, c @ x)
    many = FisherOperator(model, nn.CrossEntropyLoss(), data, mc_samples=3000, seed=0)
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    assert relative_error(many @ x, G @ x) <= 0.1
    assert relative_error(dense_ggn(model, nn.CrossEntropyLoss(), data) @ x, G @ x) <= 1e-12


def test_fisher_argument_errors() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 3), make_targets("mse", 3))
    with pytest.raises(ValueError, match="kind"):
        FisherOperator(model, nn.MSELoss(), data, kind="true")
    with pytest.raises(ValueError, match="mc_samples"):
        FisherOperator(model, nn.MSELoss(), data, mc_samples=0)
    with pytest.raises(ValueError, match="loss_fn"):
        FisherOperator(model, nn.SmoothL1Loss(), data, kind="mc")
    F = FisherOperator(model, nn.SmoothL1Loss(), data, kind="empirical")
    D = dense_fisher(model, nn.SmoothL1Loss(), data, kind="empirical")
    assert relative_error(F.matmat(np.eye(F.num_params)), D) <= 1e-10

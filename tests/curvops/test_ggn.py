"""GGNOperator against dense float64 references (J^T H_L J), flags and fallback."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.testing import check_operator_contract, dense_ggn, dense_hessian

from .conftest import (
    CASES,
    Case,
    make_inputs,
    make_mlp,
    make_targets,
    random_columns,
    relative_error,
)


def test_ggn_matches_dense(case: Case) -> None:
    model, loss, data = case.build()
    G = GGNOperator(model, loss, data, bn_mode=case.bn_mode)
    D = dense_ggn(model, loss, data, bn_mode=case.bn_mode)
    X = random_columns(G.num_params)
    assert relative_error(G.matmat(X), D @ X) <= 1e-10
    assert G.symmetric and G.psd


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=lambda c: c.id)
def test_ggn_contract(case: Case) -> None:
    model, loss, data = case.build()
    G = GGNOperator(model, loss, data, bn_mode=case.bn_mode)
    check_operator_contract(G, dense_ggn(model, loss, data, bn_mode=case.bn_mode), rtol=1e-10)


def test_ggn_equals_hessian_for_linear_model_and_mse() -> None:
    model = nn.Linear(4, 3).double()
    data = (make_inputs("mlp", 7), make_targets("mse", 7))
    G = GGNOperator(model, nn.MSELoss(), data)
    H = HessianOperator(model, nn.MSELoss(), data)
    assert relative_error(G.to_dense(), H.to_dense()) <= 1e-12


def test_mse_scaling_matches_torch_mean_over_all_elements() -> None:
    # L = mean over N*C elements => output Hessian 2/(N C) I;
    # for a linear model G = 2/(NC) X^T X (x) I
    model = nn.Linear(4, 3, bias=False).double()
    x, y = make_inputs("mlp", 5), make_targets("mse", 5)
    G = GGNOperator(model, nn.MSELoss(), (x, y)).to_dense()
    expected = torch.kron(torch.eye(3, dtype=torch.float64), x.T @ x) * (2.0 / (5 * 3))
    assert relative_error(G, expected) <= 1e-13


def test_autograd_fallback_for_other_losses() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 6), make_targets("mse", 6))
    loss = nn.SmoothL1Loss(beta=2.0)  # no closed form: autograd output Hessian
    G = GGNOperator(model, loss, data)
    assert not G.psd
    X = random_columns(G.num_params, 2)
    assert relative_error(G.matmat(X), dense_ggn(model, loss, data) @ X) <= 1e-10


def test_ggn_is_bitwise_deterministic() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 6), make_targets("ce", 6))
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    x = random_columns(G.num_params, 1)[:, 0]
    assert torch.equal(G @ x, G @ x)


def test_dense_hessian_minus_ggn_vanishes_for_linear_output_layer_subset() -> None:
    # w.r.t. the last linear layer only, f is linear in the parameters: H = G.
    model = make_mlp()
    data = (make_inputs("mlp", 6), make_targets("ce", 6))
    H = dense_hessian(model, nn.CrossEntropyLoss(), data, params=[model[3]])
    G = dense_ggn(model, nn.CrossEntropyLoss(), data, params=[model[3]])
    assert relative_error(H, G) <= 1e-12


@pytest.mark.parametrize(
    ("loss", "nll"),
    [
        (nn.NLLLoss(), True),
        (nn.functional.nll_loss, True),
        (functools.partial(nn.functional.nll_loss, ignore_index=0), True),
        (nn.L1Loss(), False),
        (nn.functional.l1_loss, False),
    ],
    ids=["NLLLoss", "F.nll_loss", "partial-nll", "L1Loss", "F.l1_loss"],
)
def test_a_loss_linear_in_the_outputs_has_no_ggn(loss: object, nll: bool) -> None:
    """Its GGN is the zero matrix (a LogSoftmax + NLLLoss model gave an all-zero
    spectrum without a word); refused with the remedy, while the Hessian and the
    empirical Fisher of the same loss are built."""
    from curvops import FisherOperator, ggn_diagonal

    model = nn.Sequential(make_mlp(), nn.LogSoftmax(-1)) if nll else make_mlp()
    x = make_inputs("mlp", 6)
    y = make_targets("ce" if nll else "mse", 6)
    match = "NLLLoss is linear" if nll else "L1Loss is piecewise linear"
    with pytest.raises(ValueError, match=rf"'loss_fn'.*{match}"):
        GGNOperator(model, loss, (x, y))
    with pytest.raises(ValueError, match=rf"'loss_fn'.*{match}"):
        ggn_diagonal(model, loss, (x, y))
    HessianOperator(model, loss, (x, y))
    FisherOperator(model, loss, (x, y), kind="empirical")
    ggn_diagonal(model, loss, (x, y), method="empirical")

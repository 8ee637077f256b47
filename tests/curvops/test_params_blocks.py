"""Parameter selection (names, modules, parameters, predicates) and per-layer blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops.algebra import BlockDiagonal
from curvops.blocks import per_layer
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.params import flatten_columns, group_by_layer, select_params, unflatten_columns
from curvops.testing import dense_ggn, dense_hessian

from .conftest import make_cnn, make_inputs, make_mlp, make_targets, relative_error


def test_selection_kinds_agree() -> None:
    net = make_cnn()
    by_names = select_params(net, ["4.weight", "1.bias"])
    by_params = select_params(net, [net[4].weight, net[1].bias])
    by_pred = select_params(net, lambda n, p: n in ("4.weight", "1.bias"))
    assert [n for n, _ in by_names] == ["1.bias", "4.weight"]  # model order
    assert by_names == by_params == by_pred
    assert [n for n, _ in select_params(net, net[1])] == ["1.weight", "1.bias"]


def test_default_is_trainable_and_shared_parameters_once() -> None:
    net = make_mlp()
    net[0].bias.requires_grad_(False)
    assert "0.bias" not in [n for n, _ in select_params(net)]
    tied = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    assert [n for n, _ in select_params(tied)] == ["0.weight", "0.bias", "1.bias"]


def test_selection_errors() -> None:
    net = make_mlp()
    with pytest.raises(ValueError, match="names of parameters"):
        select_params(net, ["nope"])
    with pytest.raises(ValueError, match="parameters of the model"):
        select_params(net, [nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="sub-modules"):
        select_params(net, [nn.Linear(1, 1)])
    with pytest.raises(ValueError, match="at least one"):
        select_params(net, lambda n, p: False)
    with pytest.raises(TypeError):
        select_params(net, 3)


def test_columns_roundtrip() -> None:
    shapes = [torch.Size([2, 3]), torch.Size([4])]
    X = torch.arange(20.0).reshape(10, 2)
    parts = unflatten_columns(X, shapes)
    assert torch.equal(parts[0][1], X[:6, 1].reshape(2, 3))
    assert torch.equal(flatten_columns(parts), X)


def test_per_layer_blocks_are_diagonal_blocks_of_dense() -> None:
    net = make_cnn()
    data = (make_inputs("cnn", 6), make_targets("ce", 6))
    loss = nn.CrossEntropyLoss()
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        B = per_layer(cls, net, loss, data, bn_mode="train")
        assert isinstance(B, BlockDiagonal)
        groups = group_by_layer(select_params(net))
        assert len(B.blocks) == len(groups) == 3
        D = dense(net, loss, data, bn_mode="train")
        mask = torch.zeros_like(D, dtype=torch.bool)
        start = 0
        for g in groups:
            size = sum(p.numel() for _, p in g)
            mask[start : start + size, start : start + size] = True
            start += size
        assert relative_error(B.to_dense(), torch.where(mask, D, 0.0)) <= 1e-10
    with pytest.raises(TypeError, match="operator_cls"):
        per_layer(nn.Linear, net, loss, data)  # type: ignore[arg-type]


def test_lazy_modules_must_be_initialised_first() -> None:
    from curvops import HessianOperator

    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(
        ValueError, match=r"'model'.*run the model on a batch.*\['0\.weight', '0\.bias'\]"
    ):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    model(x)  # the first forward pass gives the lazy layer its shape
    assert HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).shape == (39, 39)

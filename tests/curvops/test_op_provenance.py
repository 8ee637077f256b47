"""A missing derivative names the module whose forward runs the operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.op_provenance import describe_module, locate_operation, operation_name

DT = torch.float64


class Cdist(nn.Module):
    """``torch.cdist``: no double backward (torch 2.13) and no forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(
            torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x, self.w)


def _model() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    return nn.Sequential(body, nn.Sequential(nn.Identity(), Cdist())).double()


def _lacks_double_backward() -> bool:
    w = torch.randn(3, 2, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(
        torch.cdist(torch.randn(4, 2, dtype=DT), w).sum(), w, create_graph=True
    )
    try:
        torch.autograd.grad(g.sum(), w)
    except (NotImplementedError, RuntimeError):
        return True
    return False


def _lacks_forward_mode() -> bool:
    try:
        with fwAD.dual_level():
            w = fwAD.make_dual(torch.randn(3, 2, dtype=DT), torch.ones(3, 2, dtype=DT))
            torch.cdist(torch.randn(4, 2, dtype=DT), w)
    except (NotImplementedError, RuntimeError):
        return True
    return False


@pytest.mark.parametrize(
    ("make", "lacks"),
    [
        (lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d), _lacks_double_backward),
        # without forward mode, Jv is taken in reverse mode over the double backward
        (
            lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
            lambda: _lacks_forward_mode() and _lacks_double_backward(),
        ),
    ],
)
def test_missing_derivative_names_the_module(make: Any, lacks: Callable[[], bool]) -> None:
    if not lacks():
        pytest.skip("this torch has the derivative of torch.cdist")
    data = (torch.randn(4, 2, dtype=DT), torch.tensor([0, 1, 2, 0]))
    op = make(_model(), data)
    with pytest.raises(NotImplementedError) as info:
        op @ torch.ones(op.shape[0], dtype=DT)
    message = str(info.value)
    assert "runs in the forward of module '1.1' (Cdist)" in message
    assert "Replace the operation" in message


def test_operation_names_from_messages() -> None:
    assert (
        operation_name("derivative for aten::_foo_backward is not implemented") == "_foo_backward"
    )
    assert operation_name("the derivative for '_cdist_backward' is not implemented.") == (
        "_cdist_backward"
    )
    assert (
        operation_name("Trying to use forward AD with erfinv that does not support it") == "erfinv"
    )
    assert operation_name("shapes do not match") is None


def test_locate_operation() -> None:
    model = _model()
    x = torch.randn(4, 2, dtype=DT)
    assert locate_operation(model, "_cdist_backward", lambda: model(x)) == "1.1"
    assert locate_operation(model, "tanh", lambda: model(x)) == "0.1"
    assert locate_operation(model, "erfinv", lambda: model(x)) is None  # never runs
    assert locate_operation(model, "tanh", lambda: 1 / 0) is None  # a failing pass: no name
    assert not model._forward_hooks and not model[0][1]._forward_pre_hooks  # hooks removed

    class Root(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return torch.sinh(t)

    root = Root()
    assert locate_operation(root, "sinh", lambda: root(x)) == ""
    assert describe_module(root, "") == "the model's own forward (Root)"
    assert describe_module(model, "1.1") == "module '1.1' (Cdist)"

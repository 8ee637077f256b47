"""K-FAC and E-KFAC take a Linear/Conv2d subclass only if it computes what the class does.

The factors assume a layer's output is ``W a`` with ``a`` its input.  A subclass that
changes ``forward`` breaks that: timm's weight-standardised ``StdConv2d``, a layer that
rescales its input, a cosine classifier that normalises its weight were accepted as plain
layers, and K-FAC was 99 %, 75 % and 88 % off the exact GGN block at batch size 1 with
one output position (where K-FAC is exact), silently.  Now they are unsupported layers:
refused with ``remainder="error"``, their exact GGN diagonal with ``remainder="diagonal"``.
A subclass that keeps the class's ``forward`` (``nn.MultiheadAttention``'s ``out_proj``
is one) stays supported and exact.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import EKFACOperator, KFACOperator
from curvops.testing import dense_ggn

F64 = torch.float64


class _StdConv2d(nn.Conv2d):
    """Weight standardisation inside ``forward`` (timm / BiT)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2.0 * x)


class _CosineLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1), self.bias)


class _PlainSubclass(nn.Linear):
    """A subclass with the class's own forward (like MHA's ``out_proj``)."""


def _conv_net(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(3, 2))


def _linear_net(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(3, 2))


_CASES: dict[str, Any] = {
    "std-conv2d": (lambda: _conv_net(_StdConv2d(2, 3, 3)), (1, 2, 3, 3)),
    "scaled-linear": (lambda: _linear_net(_ScaledLinear(4, 3)), (1, 4)),
    "cosine-linear": (lambda: _linear_net(_CosineLinear(4, 3)), (1, 4)),
}


def _setting(make: Any, shape: tuple[int, ...]) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = make().to(F64)
    x = torch.randn(*shape, dtype=F64)
    return model, (x, torch.tensor([1]))


@pytest.mark.parametrize("operator", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("case", sorted(_CASES))
def test_subclass_with_its_own_forward_is_refused(operator: Any, case: str) -> None:
    model, data = _setting(*_CASES[case])
    with pytest.raises(ValueError, match=r"Argument 'params'.*the class's own forward"):
        operator(model, nn.CrossEntropyLoss(), data)


@pytest.mark.parametrize("case", sorted(_CASES))
def test_subclass_with_its_own_forward_gets_its_exact_diagonal(case: str) -> None:
    model, data = _setting(*_CASES[case])
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, remainder="diagonal")
    n = sum(p.numel() for p in model[0].parameters())
    got = torch.as_tensor(op @ torch.eye(op.shape[0], dtype=F64))[:n, :n]
    exact = dense_ggn(model, nn.CrossEntropyLoss(), data)[:n, :n]
    assert float(exact.diagonal().abs().max()) > 0
    torch.testing.assert_close(got, torch.diag(exact.diagonal()), rtol=1e-10, atol=1e-14)


def test_subclass_keeping_the_forward_is_exact() -> None:
    model, data = _setting(lambda: _linear_net(_PlainSubclass(4, 3)), (1, 4))
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, bias="joint")
    got = torch.as_tensor(op @ torch.eye(op.shape[0], dtype=F64))
    n = sum(p.numel() for p in model[0].parameters())
    exact = dense_ggn(model, nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(got[:n, :n], exact[:n, :n], rtol=1e-10, atol=1e-14)

"""Quantized modules (``quantize_dynamic``, ``convert``) are refused, never a zero curvature.

A quantized module's integer kernels have no derivatives, so autograd records nothing
through it: before this check a float layer followed by a dynamically quantized one had
a Hessian and a GGN of exactly zero, without an error (plain ``torch.autograd.grad``
raises, the operators ask for ``allow_unused`` because unused parameters legitimately
have zero curvature).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    ggn_diagonal,
    loss_stats,
)
from curvops.testing import dense_hessian


class FloatThenQuantized(nn.Module):
    def __init__(self, last: nn.Module) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(3, 4), last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.first(x)))


def dynamic() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch deprecates torch.ao.quantization
        warnings.simplefilter("ignore")
        last = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 2)))[0]
    return FloatThenQuantized(last)


def static() -> nn.Module:
    """Eager-mode post-training quantization: QuantStub -> Linear -> DeQuantStub, converted."""
    torch.manual_seed(0)
    tq = torch.ao.quantization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = nn.Sequential(tq.QuantStub(), nn.Linear(4, 2), tq.DeQuantStub())
        inner.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(inner, inplace=True)
        inner(torch.randn(16, 4))  # calibration
        tq.convert(inner, inplace=True)
    return FloatThenQuantized(inner)


BUILDERS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d),
    "fisher": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="mc"),
    "kfac": lambda m, d: KFACOperator(m, nn.CrossEntropyLoss(), d),
    "ggn_diagonal": lambda m, d: ggn_diagonal(m, nn.CrossEntropyLoss(), d),
    "loss_stats": lambda m, d: loss_stats(m, nn.CrossEntropyLoss(), d),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("make", [dynamic, static], ids=["dynamic", "static"])
def test_quantized_modules_are_refused(make: Callable[[], nn.Module], kind: str) -> None:
    model = make()
    data = (torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0]))
    with warnings.catch_warnings():  # the quantized kernels' own deprecation warnings
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"'model'.*without quantized modules.*'last"):
            BUILDERS[kind](model, data)


def test_float_functional_of_quantization_ready_models_passes() -> None:
    """``FloatFunctional`` lives among the quantized modules but computes in float."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.add = nn.Linear(3, 3), torch.ao.nn.quantized.FloatFunctional()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.add.add(x, torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Residual(), nn.Linear(3, 2)).double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    dense = dense_hessian(model, nn.CrossEntropyLoss(), data).numpy()
    np.testing.assert_allclose(H @ np.eye(H.shape[0]), dense, rtol=1e-12, atol=1e-14)

"""Fake quantisation (quantisation-aware training) is refused, never a surrogate's curvature.

``torch.fake_quantize_per_tensor_affine`` and its relatives round to a grid in the
forward pass and back-propagate a straight-through estimator.  The network is then
piecewise constant upstream of every quantiser (true derivatives zero almost
everywhere), and double backward through the estimator gives the curvature of a
surrogate: on the model below a Hessian 4-5 % away from the full-precision network's,
without an error before this check.  With fake quantisation switched off
(``torch.ao.quantization.disable_fake_quant``) the products are those of the
full-precision network.
"""

from __future__ import annotations

import copy
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
from curvops._model_state import model_state, state_differences
from curvops.derivative_repairs import FAKE_QUANTIZATION_FUNCTIONS, refuse_fake_quantization
from curvops.testing import dense_hessian

from .conftest import relative_error

EPS32 = float(np.finfo(np.float32).eps)


class FakeQuantized(nn.Module):
    """Per-channel fake-quantised weights and per-tensor fake-quantised activations
    (float32 inside the quantisers, as PyTorch's kernels require)."""

    def __init__(self, quantize: bool = True) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8, dtype=torch.float64)
        self.l2 = nn.Linear(8, 3, dtype=torch.float64)
        self.quantize = quantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.l1.weight
        if self.quantize:
            scale = torch.full((8,), 0.05)
            zero = torch.zeros(8, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -128, 127)
        h = torch.tanh(nn.functional.linear(x, w.double(), self.l1.bias))
        if self.quantize:
            h = torch.fake_quantize_per_tensor_affine(h.float(), 0.02, 0, -128, 127).double()
        return self.l2(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g, dtype=torch.float64), torch.arange(32) % 3


LOSS = nn.CrossEntropyLoss()

BUILDERS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, LOSS, d),
    "ggn": lambda m, d: GGNOperator(m, LOSS, d),
    "fisher": lambda m, d: FisherOperator(m, LOSS, d),
    "kfac": lambda m, d: KFACOperator(m, LOSS, d, remainder="diagonal"),
    "ggn-diagonal": lambda m, d: ggn_diagonal(m, LOSS, d),
    "loss-stats": lambda m, d: loss_stats(m, LOSS, d, batch_size=16, num_probes=2),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_fake_quantization_is_refused(kind: str) -> None:
    torch.manual_seed(0)
    model = FakeQuantized()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"Argument 'model'.*straight-through") as info:
        BUILDERS[kind](model, _data())
    assert "torch.fake_quantize_per_channel_affine" in str(info.value)
    assert "disable_fake_quant" in str(info.value)
    assert state_differences(before, model) == []


def test_the_surrogate_curvature_differs_from_the_full_precision_one() -> None:
    """What the refusal prevents: PyTorch's own double backward through the
    straight-through estimator is neither network's Hessian."""
    torch.manual_seed(0)
    model = FakeQuantized()
    data = _data()
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sizes = [p.numel() for p in model.parameters()]

    def loss(w: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, w.split(sizes), strict=True))
        params = {n: parts[n].view_as(p) for n, p in model.named_parameters()}
        out = torch.func.functional_call(model, params, (data[0],))
        return LOSS(out, data[1])

    surrogate = torch.autograd.functional.hessian(loss, w0)
    model.quantize = False
    exact = dense_hessian(model, LOSS, data)
    assert relative_error(surrogate.numpy(), exact.numpy()) > 1e-2


def test_every_fake_quantization_function_is_refused() -> None:
    assert torch.fake_quantize_per_tensor_affine in FAKE_QUANTIZATION_FUNCTIONS
    assert torch.fake_quantize_per_channel_affine in FAKE_QUANTIZATION_FUNCTIONS
    for function in FAKE_QUANTIZATION_FUNCTIONS:
        with pytest.raises(ValueError, match=function.__name__):
            refuse_fake_quantization(function)(torch.ones(2), 0.1, 0, -128, 127)


def _qat_model() -> tuple[nn.Module, nn.Module]:
    """A float32 MLP and its ``prepare_qat`` version (default x86 qconfig:
    ``FusedMovingAvgObsFakeQuantize`` on weights and activations)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).train()
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in torch 2.13
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao import quantization as tq

        qat = copy.deepcopy(plain)
        qat.qconfig = tq.get_default_qat_qconfig("x86")
        qat = tq.prepare_qat(qat)
    return plain, qat


def test_a_torch_ao_qat_model_is_refused_and_exact_with_fake_quantization_off() -> None:
    plain, qat = _qat_model()
    g = torch.Generator().manual_seed(2)
    data = (torch.randn(32, 4, generator=g), torch.arange(32) % 3)
    qat(data[0])  # observers calibrated, as after some QAT steps
    with pytest.raises(ValueError, match="fused_moving_avg_obs_fake_quant"):
        HessianOperator(qat, LOSS, data)
    from torch.ao.quantization import disable_fake_quant

    qat.apply(disable_fake_quant)
    v = np.random.default_rng(0).standard_normal(sum(p.numel() for p in plain.parameters()))
    v = v.astype(np.float32)
    for cls in (HessianOperator, GGNOperator):
        want = cls(plain, LOSS, data) @ v
        got = cls(qat, LOSS, data) @ v
        # the same float32 operations in the same order: equal up to rounding
        assert relative_error(got, want) <= 100 * EPS32, cls.__name__

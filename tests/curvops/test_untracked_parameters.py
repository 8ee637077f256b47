"""Parameters the forward pass uses only with gradients off: an error, never a zero block.

``torch.utils.checkpoint(fn, x, use_reentrant=True)`` runs ``fn`` under ``no_grad``; when
``x`` does not require a gradient nothing is recorded, so the parameters inside ``fn``
are absent from the graph.  Before :class:`curvops.differentiability.UntrackedUseRecorder`
the Hessian of such a model was wrong by 110 % and its GGN by 55 % (a silent zero block).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from curvops import FisherOperator, GGNOperator, HessianOperator, ggn_diagonal
from curvops.differentiability import UntrackedParameterError, UntrackedUseRecorder
from curvops.testing import dense_ggn, dense_hessian

from .conftest import relative_error

EPS = float(np.finfo(np.float64).eps)


class CheckpointedNet(nn.Module):
    """``last(tanh(first(x)))`` with the first layer checkpointed (or not, ``mode=None``)."""

    def __init__(self, mode: bool | None) -> None:
        super().__init__()
        self.mode = mode
        self.first = nn.Linear(3, 5)
        self.last = nn.Linear(5, 3)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.first(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.last(self._block(x))
        return self.last(checkpoint(self._block, x, use_reentrant=self.mode))


class StopGradientScale(nn.Module):
    """``x W^T / sg(||W||)``: ``W`` used with gradients off *and* on (reachable)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = self.weight.norm()
        return x @ self.weight.T / scale


class LinearFunction(torch.autograd.Function):
    """``x W^T`` as a custom function: its forward runs with gradients off."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w.T

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        return g @ w, g.mT @ x


class CustomLinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.last = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(LinearFunction.apply(x, self.w)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x, torch.tensor([0, 1, 2, 0, 1, 2])


def _checkpointed(mode: bool | None) -> nn.Module:
    torch.manual_seed(0)
    return CheckpointedNet(mode).double()


def _vector(model: nn.Module) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(sum(p.numel() for p in model.parameters()))


OPERATORS = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d),
    "hessian-two-batches": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), [d, d]),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d),
    "ggn-uncached": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "ggn-two-batches": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), [d, d]),
    "fisher": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d),
}


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_reentrant_checkpoint_without_input_gradients_is_refused(kind: str) -> None:
    model = _checkpointed(True)
    op = OPERATORS[kind](model, _data())
    with pytest.raises(UntrackedParameterError, match=r"without checkpointing") as info:
        op @ _vector(model)
    assert "'first.weight', 'first.bias'" in str(info.value)  # named by the operator
    assert info.value.indices == (0, 1)


def test_the_ggn_diagonal_refuses_too() -> None:
    model = _checkpointed(True)
    with pytest.raises(UntrackedParameterError, match=r"'first\.weight', 'first\.bias'"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), _data())


def test_non_reentrant_checkpoint_is_refused_when_the_operator_is_built() -> None:
    """Its recomputation would run outside the product (see
    ``test_activation_checkpointing.py``); the message says what to do."""
    model, data = _checkpointed(False), _data()
    with pytest.raises(RuntimeError, match=r"without checkpointing"):
        HessianOperator(model, nn.CrossEntropyLoss(), data)


def test_parameters_used_with_gradients_off_and_on_are_fine() -> None:
    torch.manual_seed(0)
    model = StopGradientScale().double()
    data = _data()
    loss_fn = nn.CrossEntropyLoss()
    v = _vector(model)
    H = dense_hessian(model, loss_fn, data).numpy()  # the same stop-gradient semantics
    assert relative_error(HessianOperator(model, loss_fn, data) @ v, H @ v) <= 1e-12


def test_parameters_passed_into_a_custom_function_are_fine() -> None:
    torch.manual_seed(0)
    model = CustomLinearNet().double()
    data = _data()
    loss_fn = nn.CrossEntropyLoss()
    v = _vector(model)
    H = dense_hessian(model, loss_fn, data).numpy()
    G = dense_ggn(model, loss_fn, data).numpy()
    tol = 100 * EPS * H.shape[0]
    assert relative_error(HessianOperator(model, loss_fn, data) @ v, H @ v) <= tol
    assert relative_error(GGNOperator(model, loss_fn, data) @ v, G @ v) <= tol


def test_an_unused_parameter_is_not_an_error() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 3), "unused": nn.Linear(3, 3)}).double()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model["used"](x)

    model.forward = forward  # type: ignore[method-assign]
    out = HessianOperator(model, nn.CrossEntropyLoss(), _data()) @ np.ones(24)
    assert np.all(out[12:] == 0.0) and np.any(out[:12] != 0.0)


def test_recorder_names_parameters_when_given_names() -> None:
    w = torch.randn(2, requires_grad=True)
    recorder = UntrackedUseRecorder([w])
    with recorder, torch.no_grad():
        constant = w * 2
    with pytest.raises(UntrackedParameterError, match=r"'layer\.weight'"):
        recorder.check([constant + torch.ones(2, requires_grad=True)], names=["layer.weight"])


class _Reversible(torch.autograd.Function):
    """Runs a layer with gradients disabled and would recompute it in its backward, like
    Hugging Face Reformer's ``_ReversibleFunction`` (whose parameters are not inputs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return x + torch.tanh(layer(x))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None  # (a real one recomputes the layer and accumulates its .grad)


class ReversibleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 3)  # the hidden states require gradients, as in Reformer
        self.block = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_Reversible.apply(self.embed(x), self.block))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_a_reversible_function_is_named_as_the_cause(kind: str) -> None:
    """Before: the message blamed reentrant checkpointing only (the HF sweep's Reformer)."""
    torch.manual_seed(0)
    model = ReversibleNet().double()
    op = OPERATORS[kind](model, _data())
    with pytest.raises(UntrackedParameterError, match=r"'block\.weight', 'block\.bias'") as info:
        op @ _vector(model)
    message = str(info.value)
    assert "_Reversible" in message and "reversible residual layers" in message
    assert info.value.functions == (f"{__name__}._Reversible",)


def test_checkpointing_is_not_blamed_on_torch_functions() -> None:
    model = _checkpointed(True)
    with pytest.raises(UntrackedParameterError) as info:
        HessianOperator(model, nn.CrossEntropyLoss(), _data()) @ _vector(model)
    assert info.value.functions == () and "reversible" not in str(info.value)

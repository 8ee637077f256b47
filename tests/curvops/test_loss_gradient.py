"""``ModelCurvatureOperator.loss_gradient``: the gradient of the loss the operator is the
curvature of, batches weighted like the products -- and ``compare``'s default gradient.

Before, ``compare`` weighted the batches' gradients by their sample counts: with padding
tokens the default gradient was 68 % off the gradient of the concatenated batch, and
with ``reduction="sum"`` half of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import Diagonal, GGNOperator, HessianOperator, compare
from spectral.errors import NumericalError

from .conftest import small_classifier

X = torch.randn(12, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
# batch 0 is mostly padding, batch 2 all padding (skipped), class 2 weighted 3x
Y = torch.tensor([0, -100, -100, -100, 1, 2, 0, 1, -100, -100, -100, -100])
SPLITS = [(0, 4), (4, 8), (8, 12)]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[a:b], Y[a:b]) for a, b in SPLITS]


def _reference(net: nn.Module, loss: nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(loss(net(X), Y), list(net.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


LOSSES = {
    "padding": lambda: nn.CrossEntropyLoss(),
    "class-weights": lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 3.0]).double()),
    "sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_list_of_batches_gives_the_concatenated_batchs_gradient(name: str) -> None:
    net, loss = small_classifier(), LOSSES[name]()
    ref = _reference(net, loss)
    for cls in (HessianOperator, GGNOperator):
        g = cls(net, loss, _batches()).loss_gradient()
        assert g.dtype == torch.float64 and g.shape == ref.shape
        assert float((g - ref).norm()) <= 1e-14 * float(ref.norm())


def test_single_batch_is_the_batch_gradient_bitwise() -> None:
    net, loss = small_classifier(), nn.CrossEntropyLoss()
    x, y = X[4:8], Y[4:8]
    ref = torch.autograd.grad(loss(net(x), y), list(net.parameters()))
    assert torch.equal(
        HessianOperator(net, loss, (x, y)).loss_gradient(), torch.cat([g.reshape(-1) for g in ref])
    )


class TupleOutput(nn.Module):
    """Returns ``(aux, logits)``: the operator needs ``output_fn`` to pick the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_classifier()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sum(1), self.net(x)


def test_output_fn_model_mode_and_grad_are_respected() -> None:
    model = TupleOutput()
    model.net[0].weight.grad = torch.full_like(model.net[0].weight, 7.0)
    H = HessianOperator(model, nn.CrossEntropyLoss(), _batches(), output_fn=lambda out: out[1])
    g = H.loss_gradient()
    ref = _reference(model.net, nn.CrossEntropyLoss())
    assert float((g - ref).norm()) <= 1e-14 * float(ref.norm())
    assert torch.equal(model.net[0].weight.grad, torch.full_like(model.net[0].weight, 7.0))
    assert model.net[2].weight.grad is None and model.training


def test_non_finite_gradient_is_an_error() -> None:
    net = small_classifier()
    H = HessianOperator(net, nn.CrossEntropyLoss(), _batches())
    with torch.no_grad():
        net[2].bias[0] = float("nan")
    with pytest.raises(NumericalError, match=r"loss_gradient.*not finite.*2\.bias"):
        H.loss_gradient()


def _gradient_fields(report: Any) -> dict[str, float]:
    return {k: v for k, v in vars(report).items() if "grad" in k and isinstance(v, float)}


def test_compare_defaults_to_the_loss_gradient() -> None:
    """The report's gradient measures equal those with the concatenated batch's gradient."""
    net, loss = small_classifier(), nn.CrossEntropyLoss()
    G = GGNOperator(net, loss, _batches())
    approx = Diagonal(np.diag(G @ np.eye(G.shape[0])) + 1e-3)
    kwargs: dict[str, Any] = {"k": 2, "num_iters": 20, "num_directions": 2, "seed": 0}
    default = compare(approx, G, **kwargs)
    given = compare(approx, G, gradient=_reference(net, loss), **kwargs)
    fields = _gradient_fields(default)
    assert fields, "the report has gradient measures"
    for key, value in fields.items():
        assert value == pytest.approx(_gradient_fields(given)[key], rel=1e-10, abs=1e-14), key
    assert np.isfinite(list(fields.values())).all()

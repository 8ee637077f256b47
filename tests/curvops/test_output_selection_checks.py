"""The default output selection, checked against the loss on the first batch.

Before: a model returning ``(prediction, penalty)`` with a loss reading ``out[0]`` and
``out[1]`` silently got the selected prediction, so the loss read its rows (Hessian 34 %
off at batch 2, 100 % at batch 5); a loss unpacking ``mu, var = out`` or indexing
``out["out"]`` failed with a bare ``ValueError`` / ``IndexError`` that did not mention the
selection.  Now the ambiguity is refused naming ``output_fn``, and a loss failing on the
selected tensor carries a note naming the selection.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.testing import dense_hessian

DT = torch.float64


class TupleNet(nn.Module):
    """``(prediction, positive scale)``: a Gaussian's mean and variance."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.mu, self.lv = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x))
        return self.mu(h), self.lv(h).exp()


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(x))
        return {"hidden": h, "out": self.o(h)}


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(1))


def test_a_loss_failing_on_the_selected_tensor_names_the_selection() -> None:
    def gnll(out: Any, y: torch.Tensor) -> torch.Tensor:
        mu, var = out
        return F.gaussian_nll_loss(mu, y, var)

    y = torch.randn(6, 1, dtype=DT)
    with pytest.raises(ValueError, match="too many values to unpack") as info:
        HessianOperator(TupleNet().to(DT), gnll, (_x(), y))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "selected by default: the first item of a tuple of 2" in notes
    assert "output_fn=" in notes

    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(IndexError) as index_info:
        HessianOperator(
            DictNet().to(DT), lambda o, t: F.cross_entropy(o["out"], t), (_x(), targets)
        )
    notes = " ".join(getattr(index_info.value, "__notes__", []))
    assert "the 'hidden' entry of a dict with tensors ['hidden', 'out']" in notes
    op = HessianOperator(  # what the note suggests
        DictNet().to(DT), nn.CrossEntropyLoss(), (_x(), targets), output_fn=lambda o: o["out"]
    )
    assert op.shape == (31, 31)


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # rows, as written
@pytest.mark.parametrize("n", [2, 5])
def test_a_loss_taking_the_whole_output_too_is_ambiguous(n: int) -> None:
    def loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out[0], y) + 0.1 * out[1].mean()

    y = torch.randn(n, 1, dtype=DT)
    for cls in (HessianOperator, GGNOperator):
        with pytest.raises(ValueError, match=r"Argument 'output_fn'.*ambiguous"):
            cls(TupleNet().to(DT), loss, (_x(n), y))


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # rows, as written
def test_unambiguous_losses_are_accepted_and_exact() -> None:
    net, x, y = TupleNet().to(DT), _x(), torch.randn(6, 1, dtype=DT)

    def either(out: Any, t: torch.Tensor) -> torch.Tensor:  # the same value for both
        return F.mse_loss(out[0] if isinstance(out, tuple) else out, t)

    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)[0]

    H = HessianOperator(net, either, (x, y)).to_dense()
    ref = dense_hessian(First(), nn.MSELoss(), (x, y))
    assert float((H - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    # the loss refuses the whole tuple (a tensor function): the selection is meant
    HessianOperator(net, nn.MSELoss(), (x, y))
    # an explicit output_fn is never second-guessed, even one equal to the default
    loss = lambda o, t: F.mse_loss(o[0], t)  # noqa: E731 - reads rows, as the user asked
    HessianOperator(net, loss, (x, y), output_fn=lambda o: o[0])


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")
def test_nested_and_zero_dimensional_default_selections_are_refused() -> None:
    """Before: ``(mean, [var])`` counted one tensor, so a loss reading ``o[1][0]`` read a
    row of the mean (0.83 off); a dict whose first tensor is a 0-dimensional ``loss`` was
    selected and taken as the outputs."""

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TupleNet()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            mu, var = self.inner(x)
            return mu, [var]

    def gnll(out: Any, y: torch.Tensor) -> torch.Tensor:  # log-variance nested in a list
        return F.gaussian_nll_loss(out[0], y, out[1][0].exp())

    y = torch.randn(6, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"Argument 'output_fn'.*ambiguous"):
        HessianOperator(Nested().to(DT), gnll, (_x(), y))

    class LossFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TupleNet()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            mu, _ = self.inner(x)
            return {"loss": mu.pow(2).mean(), "pred": mu}

    with pytest.raises(ValueError, match=r"0-dimensional tensor"):
        HessianOperator(LossFirst().to(DT), nn.MSELoss(), (_x(), y))
    HessianOperator(LossFirst().to(DT), nn.MSELoss(), (_x(), y), output_fn=lambda o: o["pred"])

"""A loss computed inside the model (a Hugging Face model given its ``labels``, selected with
``output_fn=lambda out: out.loss``) is a 0-dimensional output: its Hessian is fine, but the
GGN under an identity ``loss_fn`` is exactly zero and the Fisher has no per-sample terms, so
those are refused naming ``output_fn``; non-finite model outputs are named as the model's,
not blamed on the loss; the advice for an unknown normaliser covers shifted labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.diagonal import ggn_diagonal
from curvops.testing import dense_hessian


class LossInside(nn.Module):
    """Returns ``{"logits", "loss"}``; the loss from the ``labels`` input, as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def identity(value: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return value


def data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    return {"x": x, "labels": y}, y


def select_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return out["loss"]


def test_ggn_and_fisher_of_a_loss_computed_inside_the_model_are_refused() -> None:
    model = LossInside().double()
    batch = data()
    builds: list[Any] = [
        lambda: GGNOperator(model, identity, batch, output_fn=select_loss),
        lambda: FisherOperator(model, identity, batch, output_fn=select_loss, kind="empirical"),
        lambda: FisherOperator(
            model, identity, batch, output_fn=select_loss, kind="empirical", per="position"
        ),
    ]
    for build in builds:
        with pytest.raises(ValueError, match=r"'output_fn'.*0-dimensional output"):
            build()


def test_the_hessian_of_a_loss_computed_inside_the_model_is_exact() -> None:
    model = LossInside().double()
    (inputs, y) = data()
    H = HessianOperator(model, identity, (inputs, y), output_fn=select_loss)
    reference = dense_hessian(model.net, nn.CrossEntropyLoss(), (inputs["x"], y)).numpy()
    eye = np.eye(H.shape[0])
    assert np.abs(H @ eye - reference).max() <= 1e-12 * np.abs(reference).max()
    # the logits with the loss outside give the GGN (positive: not the zero matrix)
    G = GGNOperator(model, nn.CrossEntropyLoss(), (inputs, y), output_fn=lambda o: o["logits"])
    assert np.trace(G @ eye) > 0


def test_ggn_diagonal_of_a_scalar_output_is_refused() -> None:
    class ScalarOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).pow(2).mean()

    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"'output_fn'.*ggn_diagonal"):
        ggn_diagonal(ScalarOut(), identity, (x, torch.zeros(5)))


def test_non_finite_outputs_are_named_as_the_models() -> None:
    class MaskedRows(nn.Module):
        """Row 1's outputs are NaN, like an attention row whose mask hides every key."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            nan = torch.zeros_like(out)
            nan[1] = float("nan")
            return out + nan

    x, y = torch.randn(3, 3), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"'model'.*4 non-finite of 12 output values.*\(1, 0\)"):
        HessianOperator(MaskedRows(), nn.CrossEntropyLoss(), (x, y))


def test_unknown_normaliser_advice_covers_shifted_labels() -> None:
    model = nn.Linear(3, 4)
    y = torch.tensor([0, -100, 2])

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, t)

    with pytest.raises(ValueError, match=r"shifts the labels.*y\[:, 1:\] != -100"):
        HessianOperator(model, loss, (torch.randn(3, 3), y))

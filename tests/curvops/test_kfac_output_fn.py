"""K-FAC / E-KFAC select the model's output like the exact operators (``output_fn=``): a
model returning a mapping gives the K-FAC of the selected entry, bitwise that of the same
layers returning it directly; a 0-dimensional selection (a loss computed inside the
model) is refused naming ``output_fn``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import EKFACOperator, KFACOperator


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4))
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.body(x)
        out = {"start_logits": self.a(h), "end_logits": self.b(h)}
        if y is not None:
            out["loss"] = F.cross_entropy(out["end_logits"], y)
        return out


class EndOnly(nn.Module):
    def __init__(self, heads: TwoHeads) -> None:
        super().__init__()
        self.body, self.b = heads.body, heads.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.body(x))


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
def test_output_fn_selects_the_entry(cls: type, fisher: str) -> None:
    heads = TwoHeads().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    loss = nn.CrossEntropyLoss()
    names = ["body.0.weight", "body.0.bias", "b.weight", "b.bias"]
    K = cls(heads, loss, (x, y), fisher=fisher, params=names, output_fn=lambda o: o["end_logits"])
    ref = cls(EndOnly(heads), loss, (x, y), fisher=fisher, params=names)
    eye = np.eye(K.shape[0])
    assert np.array_equal(K @ eye, ref @ eye)
    start = ["body.0.weight", "a.weight"]  # no "logits" key: the first entry, start_logits
    default = cls(heads, loss, (x, y), fisher=fisher, params=start)
    chosen = cls(
        heads, loss, (x, y), fisher=fisher, params=start, output_fn=lambda o: o["start_logits"]
    )
    eye = np.eye(default.shape[0])
    assert np.array_equal(default @ eye, chosen @ eye)


def test_output_fn_reaches_the_remainder_diagonal() -> None:
    """The LayerNorm's parameters are outside K-FAC's layers: their exact diagonal."""
    heads = TwoHeads().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    names = ["body.0.weight", "body.2.weight", "b.weight"]
    loss = nn.CrossEntropyLoss()
    K = KFACOperator(
        heads, loss, (x, y), params=names, remainder="diagonal", output_fn=lambda o: o["end_logits"]
    )
    ref = KFACOperator(EndOnly(heads), loss, (x, y), params=names, remainder="diagonal")
    eye = np.eye(K.shape[0])
    assert np.array_equal(K @ eye, ref @ eye)


def test_a_loss_computed_inside_the_model_is_refused() -> None:
    heads = TwoHeads().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"'output_fn'.*KFACOperator.*0-dimensional"):
        KFACOperator(
            heads,
            lambda value, t: value,
            ({"x": x, "y": y}, y),
            fisher="empirical",
            output_fn=lambda o: o["loss"],
        )

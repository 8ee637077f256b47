"""A layer applied to tokens flattened to ``(N T, d)`` (the same function, gradients and GGN
as on ``(N, T, d)``) gets the same K-FAC: its ``N T`` rows were counted as samples, so its
factors came out ``T`` times too large; a leading dimension that is not a multiple of the
batch's samples is refused naming ``model``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import EKFACOperator, KFACOperator

B, T, D, V = 3, 4, 3, 5


class Net(nn.Module):
    def __init__(self, flat: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.flat = flat
        self.l1, self.head = nn.Linear(D, 4), nn.Linear(4, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.flat:
            return self.head(h.reshape(-1, h.shape[-1])).reshape(x.shape[0], T, V).transpose(1, 2)
        return self.head(h).transpose(1, 2)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_flattened_tokens_give_the_same_kfac(cls: type, fisher: str, approx: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    loss = nn.CrossEntropyLoss()
    ops = [
        cls(Net(flat).double(), loss, (x, y), fisher=fisher, approx=approx)
        for flat in (False, True)
    ]
    eye = np.eye(ops[0].shape[0])
    np.testing.assert_allclose(ops[1] @ eye, ops[0] @ eye, rtol=1e-12, atol=1e-15)


def test_a_leading_dimension_not_a_multiple_of_the_samples_is_refused() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # the layer sees 2 rows for a batch of 3 samples
            return self.head(x[:2]).sum(0, keepdim=True).expand(x.shape[0], 2)

    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"'model'.*samples along dimension 0.*\(2, 3\)"):
        KFACOperator(
            Pooled().double(), nn.CrossEntropyLoss(), (x, y), fisher="empirical"
        ) @ np.ones(8)
